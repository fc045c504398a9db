from ttd.cli.main import main

main()
