//! What the simulator holds of Gemini beyond the shared batch machinery: upload sessions and
//! how each batch shows.

use std::collections::HashMap;

/// Upload sessions and what Gemini shows of its batches beyond the shared machinery.
#[derive(Debug, Default)]
pub(crate) struct GeminiState {
    pub(crate) uploads: HashMap<String, Upload>,
    /// Finalized upload sessions and the file each made: a query on one answers `final`.
    pub(crate) finalized: HashMap<String, String>,
    pub(crate) batches: HashMap<String, GeminiBatch>,
}

/// What Gemini shows of a batch beyond the shared machinery.
#[derive(Debug, Clone)]
pub(crate) struct GeminiBatch {
    pub(crate) display_name: String,
    pub(crate) model: String,
    /// Sent inline: the answers go in the operation, not in a file.
    pub(crate) inline: bool,
}

#[derive(Debug)]
pub(crate) struct Upload {
    pub(crate) display_name: String,
    pub(crate) declared: u64,
    pub(crate) bytes: Vec<u8>,
}
