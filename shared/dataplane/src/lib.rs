//! The data plane: DuckDB indexing of the input table, request rendering, shard cutting,
//! merge and finalize SQL, result-cache segments, and the cost estimate. Synchronous and
//! free of NATS, so that its benchmarks and fuzz targets run on it alone.

pub mod estimate;
pub mod render;
pub mod table;
pub mod tail;
