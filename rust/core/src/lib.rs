//! featstore-core: the per-file, parallel half of featstore, with no Python in it.
//!
//! - [`key`]: stamps, digests, entry keys and the legacy SHA256 key;
//! - [`scan`]: parallel discovery of source files;
//! - [`entry`]: the aligned safetensors entry format: writer, validating reader, mappings;
//! - [`manifest`]: the manifest, the per-rank journals and their merge;
//! - [`index`]: the index's immutable, memory-mapped segments and their compaction;
//! - [`pack`]: immutable files holding many entries, each readable by its range;
//! - [`jsonl`]: the per-line digests of a `.jsonl` listing (an input that is one line of a file);
//! - [`history`]: the key, stamps and content chains of a history's prefixes;
//! - [`store`]: entry locations, layouts and the validity check;
//! - [`judged`]: removing and moving only the very file that was judged;
//! - [`pool`]: featstore's own, fork-aware thread pools.

pub mod entry;
pub mod error;
pub mod history;
pub mod index;
pub mod jsonl;
pub mod judged;
pub mod key;
pub mod manifest;
pub mod pack;
pub mod pool;
pub mod scan;
pub mod store;

pub use error::{Error, Result};
