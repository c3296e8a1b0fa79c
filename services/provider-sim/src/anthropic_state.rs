//! What the simulator keeps of Anthropic batches: plain data, so that the simulator's state
//! can hold it without its module importing the Anthropic handlers.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use serde_json::Value;

#[derive(Debug, Default)]
pub struct AnthropicState {
    pub(crate) batches: HashMap<String, Batch>,
    pub(crate) order: Vec<String>,
    /// How often each request (by hash) was submitted: its attempt number.
    pub(crate) seen: HashMap<[u8; 32], u32>,
    pub(crate) first_attempt_batches: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct Batch {
    pub(crate) id: String,
    pub(crate) requests: Vec<Value>,
    /// Attempt number of each request.
    pub(crate) attempts: Vec<u32>,
    pub(crate) created: Instant,
    pub(crate) created_at: String,
    pub(crate) expires_at: String,
    /// How many requests get done before it expires, when it does.
    pub(crate) expires_after: Option<usize>,
    pub(crate) cancel_requested: Option<(Instant, String)>,
    pub(crate) ended: Option<Ended>,
}

#[derive(Debug, Clone)]
pub(crate) struct Ended {
    pub(crate) at: String,
    pub(crate) counts: Value,
    pub(crate) results: Bytes,
}

impl AnthropicState {
    /// Batches created.
    pub(crate) fn created(&self) -> usize {
        self.order.len()
    }

    /// Batches a cancel was asked for.
    pub(crate) fn cancelled(&self) -> usize {
        self.batches
            .values()
            .filter(|b| b.cancel_requested.is_some())
            .count()
    }
}
