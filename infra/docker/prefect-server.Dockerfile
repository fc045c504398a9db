# The Prefect server of infra/compose.yaml, with the project's pins (constraints.txt): Prefect 3.9's scheduler
# creates no scheduled run with SQLAlchemy 2.1 (see constraints.txt), which an unpinned image can bring.
#   docker build -f infra/docker/prefect-server.Dockerfile -t ttd-prefect-server .     (from the repository root)
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

COPY constraints.txt /tmp/constraints.txt
RUN pip install -c /tmp/constraints.txt prefect sqlalchemy \
 && python -c "import prefect, sqlalchemy; print('prefect', prefect.__version__, 'sqlalchemy', sqlalchemy.__version__)"

EXPOSE 4200
CMD ["prefect", "server", "start", "--host", "0.0.0.0"]
