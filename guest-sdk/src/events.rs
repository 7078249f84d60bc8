//! Events: replicated facts a guest publishes while it applies an entry (`waft:fsm@0.2.0`).
//!
//! Every replica emits the same events at the same entry, in the same order; clients follow
//! them with `Watch` (`waft watch --events PREFIX`, the client crates' `watch_events`),
//! filtered by service and topic prefix, resumable from a log index. Emitting is an effect of
//! the call: it counts only if the call returns `Ok`.
//!
//! Limits (a call over one is refused as a whole, its changes undone): 4 MiB per event (topic
//! and data), 1,000 events and 16 MiB per call.

/// Publishes `data` under `topic`.
pub fn emit(topic: &str, data: &[u8]) {
    #[cfg(target_arch = "wasm32")]
    crate::bindings::waft::fsm::events::emit(topic, data);
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::record(crate::testing::Effect::Emit {
        topic: topic.to_owned(),
        data: data.to_vec(),
    });
}
