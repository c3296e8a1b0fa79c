//! The poller service: watches each submitted batch with escalating delays (a NAK whose delay
//! comes from the schedule indexed by the delivery count), and when the batch ends stores its
//! output and error files and publishes `rowsmith.batches.ended`.

pub mod handler;
pub mod service;

pub use handler::{Poller, handle, next_delay};
pub use service::{Config, run};
