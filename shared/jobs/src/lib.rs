//! Steps on a job that ingest and the merger both take, over the bus, the store and the data
//! plane: cutting, storing and announcing shards (a first attempt at ingest, a retry at the
//! merger) and writing the job's outputs (ingest when every row came from the cache, the
//! merger otherwise).

pub mod outputs;
pub mod shards;
