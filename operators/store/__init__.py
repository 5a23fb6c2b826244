"""Storage and the data contract: run roots, Parquet tables, ids, job records, readers."""
