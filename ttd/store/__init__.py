"""The store: hive-partitioned Parquet tables committed per shard by manifest (`store`), their versioned schemas
(`schemas`), work claims between concurrent runs (`claims`), local and fsspec locations (`uri`), read-only SQL
over every table (`sql`), compaction of many small files (`compact`) and the `masks` table's quantised
heatmaps (`heatmap`)."""
