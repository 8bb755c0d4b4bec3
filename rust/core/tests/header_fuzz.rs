//! Hostile entries: structure-aware fuzzing of the entry header parser.
//!
//! Every case starts from a valid entry written by `write_entry` and damages it the way a torn
//! copy, a bit flip, another writer or an attacker would: the length prefix, the header JSON
//! (offsets, dtypes, shapes, metadata, numbers that overflow, garbage), the file's length. The
//! parser must return either a header that upholds every invariant the readers rely on (they hand
//! tensors to torch in place), or `Error::Corrupt` naming the file: never a panic, never another
//! error.
//!
//! `cargo test` runs a few thousand cases; CI runs a million in a release build (cargo-fuzz needs
//! a nightly toolchain):
//!
//! ```text
//! FEATSTORE_FUZZ_CASES=1000000 cargo test --release -p featstore-core --test header_fuzz
//! ```
//!
//! The files in `tests/corpus/` are replayed on every run, here and from Python
//! (`tests/reliability/test_hostile_entries.py`); `tests/reliability/corpus.py` makes them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use featstore_core::entry::{
    self, parse_entry_bytes, read_header, write_entry, Dtype, Header, ReadMode, TensorData,
    MAX_HEADER_LEN,
};
use featstore_core::Error;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::{Map, Value};

/// Cases per property: `FEATSTORE_FUZZ_CASES` when set, else enough for a quick `cargo test`;
/// `divisor` scales down the slower property that goes through files. (`PROPTEST_CASES`, read by
/// proptest itself, would set every property to the same count.)
fn config(divisor: u32) -> ProptestConfig {
    let cases = std::env::var("FEATSTORE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(4096);
    ProptestConfig {
        cases: (cases / divisor).max(1),
        // Inputs worth keeping go into tests/corpus instead (proptest cannot locate this crate's
        // source from an integration test anyway).
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const FAKE_PATH: &str = "/fuzz/scene/img.jpg.vggt.safetensors";

/// Valid entries to start from, written once by the real writer: several dtypes and alignments,
/// zero-sized and scalar tensors, metadata only, no metadata, odd names.
fn bases() -> &'static [Vec<u8>] {
    static BASES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    BASES.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let meta = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let featstore_meta = meta(&[
            ("feature", "vggt"),
            ("fingerprint", "0123456789abcdef"),
            ("source", "scene/img.jpg"),
            ("source.size", "1234"),
            ("source.mtime_ns", "1700000000000000000"),
            ("racy", "0"),
        ]);
        let bytes = |n: usize| (0..n).map(|i| (i * 7 + 3) as u8).collect::<Vec<u8>>();
        let t = |name: &str, dtype: Dtype, shape: &[u64], data: &'static [u8]| TensorData {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            data,
        };
        let leak = |v: Vec<u8>| -> &'static [u8] { Box::leak(v.into_boxed_slice()) };
        let cases: Vec<(Vec<TensorData>, BTreeMap<String, String>)> = vec![
            (
                vec![t("features", Dtype::F32, &[48], leak(bytes(192)))],
                featstore_meta.clone(),
            ),
            (
                vec![
                    t("f64", Dtype::F64, &[3, 2], leak(bytes(48))),
                    t("f32", Dtype::F32, &[5], leak(bytes(20))),
                    t("bf16", Dtype::BF16, &[7], leak(bytes(14))),
                    t("i16", Dtype::I16, &[3], leak(bytes(6))),
                    t("u8", Dtype::U8, &[13], leak(bytes(13))),
                    t("mask", Dtype::Bool, &[2], leak(vec![0, 1])),
                ],
                featstore_meta.clone(),
            ),
            (
                vec![
                    t("empty", Dtype::F32, &[0, 5], leak(Vec::new())),
                    t("none", Dtype::I64, &[0], leak(Vec::new())),
                    t("ids", Dtype::U8, &[3], leak(bytes(3))),
                ],
                meta(&[("note", "zero-sized tensors")]),
            ),
            (
                vec![t("scalar", Dtype::F32, &[], leak(bytes(4)))],
                meta(&[]),
            ),
            (Vec::new(), featstore_meta.clone()),
            (
                vec![t("latent", Dtype::F16, &[4, 16, 16], leak(bytes(2048)))],
                meta(&[("caption", "a \"quoted\" caption, with unicode: é✓")]),
            ),
            (
                vec![
                    t("a b", Dtype::I32, &[2, 2], leak(bytes(16))),
                    t("é✓", Dtype::U16, &[1], leak(bytes(2))),
                ],
                meta(&[("", "empty key")]),
            ),
        ];
        cases
            .iter()
            .enumerate()
            .map(|(i, (tensors, metadata))| {
                let path = dir.path().join(format!("base{i}.safetensors"));
                write_entry(&path, tensors, metadata, false).expect("base entry writes");
                std::fs::read(&path).expect("base entry reads")
            })
            .collect()
    })
}

/// A mutation of the header's JSON, applied before it is serialized again.
#[derive(Debug, Clone)]
enum JsonMut {
    /// Sets field `dtype`, `shape` or `data_offsets` of a tensor to any JSON value.
    Field {
        tensor: Index,
        field: &'static str,
        value: Value,
    },
    Offsets {
        tensor: Index,
        start: u64,
        end: u64,
    },
    /// Moves both offsets of a tensor: holes, overlaps, ranges past the end.
    Shift {
        tensor: Index,
        delta: i64,
    },
    Shape {
        tensor: Index,
        shape: Vec<u64>,
    },
    Dtype {
        tensor: Index,
        name: String,
    },
    Remove {
        tensor: Index,
        field: &'static str,
    },
    /// Replaces a tensor's whole description.
    Tensor {
        tensor: Index,
        value: Value,
    },
    Add {
        name: String,
        value: Value,
    },
    Rename {
        tensor: Index,
        name: String,
    },
    /// Swaps the offsets of two tensors.
    Swap {
        a: Index,
        b: Index,
    },
    Metadata(Value),
    MetaEntry {
        key: String,
        value: Value,
    },
    Root(Value),
    /// Replaces the whole header with this text (deep nesting, truncated JSON, ...).
    RootText(String),
}

/// A mutation of the file's bytes, applied after the header is serialized.
#[derive(Debug, Clone)]
enum ByteMut {
    Prefix(u64),
    Truncate(Index),
    Flip { at: Index, mask: u8 },
    Splice { at: Index, text: Vec<u8> },
    Delete { at: Index, len: u8 },
    Append(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Case {
    base: Index,
    json: Vec<JsonMut>,
    /// Pad the mutated header so the data section stays 64-byte aligned (else alignment errors
    /// would hide the deeper checks).
    pad: bool,
    bytes: Vec<ByteMut>,
}

/// Numbers at the edges: zero, small, alignment boundaries, i64/u64 limits, 2^53.
fn edge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..300u64,
        Just(u32::MAX as u64),
        Just(1u64 << 53),
        Just(i64::MAX as u64),
        Just(i64::MAX as u64 + 1),
        Just(u64::MAX - 1),
        Just(u64::MAX),
        Just(MAX_HEADER_LEN),
        Just(MAX_HEADER_LEN + 1),
        any::<u64>(),
    ]
}

/// Dimensions: zeros and ones (which make huge neighbours legal byte counts), small, edges.
fn dim() -> impl Strategy<Value = u64> {
    prop_oneof![3 => 0..3u64, 1 => 3..100u64, 2 => edge_u64()]
}

/// Number texts serde_json cannot hold in an integer: spliced in raw (see `raw`).
const RAW_NUMBERS: &[&str] = &[
    "18446744073709551616",
    "99999999999999999999999999999",
    "-1",
    "-9223372036854775809",
    "1e400",
    "-0",
    "1.0",
    "0.5e1",
    "1E2",
    "00",
];

/// A JSON string that `serialize` replaces by `text` without quotes.
fn raw(text: &str) -> Value {
    Value::String(format!("\u{0}RAW:{text}"))
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        edge_u64().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop_oneof![Just(0.5f64), Just(-0.0), Just(1e300), Just(3.0)].prop_map(Value::from),
        prop::sample::select(RAW_NUMBERS).prop_map(raw),
    ]
}

const DTYPE_NAMES: &[&str] = &[
    "BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
    "I64", "U64", "F64", "F128", "f32", "", "C64", "I4", "F32 ", "F3\u{0}2",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        number(),
        ".{0,10}".prop_map(Value::from),
        prop::sample::select(DTYPE_NAMES).prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::vec(("[a-z_]{0,8}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Offsets, shapes and dtypes as the writer would put them, but wrong.
fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::collection::vec(number(), 0..4).prop_map(Value::from),
        json_value(),
    ]
}

const FIELDS: &[&str] = &["dtype", "shape", "data_offsets"];

fn tensor_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("__metadata__".to_string()),
        Just("features".to_string()),
        Just(String::new()),
        ".{0,8}",
    ]
}

/// Whole headers that are not headers: deep nesting (serde's recursion limit), truncated or
/// empty JSON, other JSON types, a byte order mark, NULs, duplicate keys.
fn root_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (1usize..2_000).prop_map(|n| "[".repeat(n) + &"]".repeat(n)),
        (1usize..2_000).prop_map(|n| "{\"a\":".repeat(n)),
        prop::sample::select(&[
            "",
            "{",
            "}",
            "null",
            "[]",
            "\"x\"",
            "\u{feff}{}",
            "{}\u{0}",
            "{\"__metadata__\":{\"a\":\"1\"},\"__metadata__\":[]}",
            "{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
        ][..])
        .prop_map(str::to_string),
        ".{0,64}",
    ]
}

fn json_mut() -> impl Strategy<Value = JsonMut> {
    prop_oneof![
        4 => (any::<Index>(), prop::sample::select(FIELDS), field_value())
            .prop_map(|(tensor, field, value)| JsonMut::Field { tensor, field, value }),
        3 => (any::<Index>(), edge_u64(), edge_u64())
            .prop_map(|(tensor, start, end)| JsonMut::Offsets { tensor, start, end }),
        3 => (any::<Index>(), prop_oneof![-80i64..80, any::<i64>()])
            .prop_map(|(tensor, delta)| JsonMut::Shift { tensor, delta }),
        3 => (any::<Index>(), prop::collection::vec(dim(), 0..5))
            .prop_map(|(tensor, shape)| JsonMut::Shape { tensor, shape }),
        3 => (
            any::<Index>(),
            prop::sample::select(DTYPE_NAMES).prop_map(str::to_string)
        )
            .prop_map(|(tensor, name)| JsonMut::Dtype { tensor, name }),
        1 => (any::<Index>(), prop::sample::select(FIELDS))
            .prop_map(|(tensor, field)| JsonMut::Remove { tensor, field }),
        1 => (any::<Index>(), json_value()).prop_map(|(tensor, value)| JsonMut::Tensor { tensor, value }),
        1 => (tensor_name(), json_value()).prop_map(|(name, value)| JsonMut::Add { name, value }),
        1 => (any::<Index>(), tensor_name()).prop_map(|(tensor, name)| JsonMut::Rename { tensor, name }),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| JsonMut::Swap { a, b }),
        1 => json_value().prop_map(JsonMut::Metadata),
        1 => (".{0,6}", json_value()).prop_map(|(key, value)| JsonMut::MetaEntry { key, value }),
        1 => json_value().prop_map(JsonMut::Root),
        1 => root_text().prop_map(JsonMut::RootText),
    ]
}

fn byte_mut() -> impl Strategy<Value = ByteMut> {
    prop_oneof![
        edge_u64().prop_map(ByteMut::Prefix),
        any::<Index>().prop_map(ByteMut::Truncate),
        (any::<Index>(), 1..=255u8).prop_map(|(at, mask)| ByteMut::Flip { at, mask }),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, text)| ByteMut::Splice { at, text }),
        (any::<Index>(), any::<u8>()).prop_map(|(at, len)| ByteMut::Delete { at, len }),
        prop::collection::vec(any::<u8>(), 1..80).prop_map(ByteMut::Append),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    // Every case damages something (the undamaged bases are checked by `bases_are_valid`).
    // Byte damage mostly fails early (a length that no longer fits), so it is in a quarter of
    // the cases and the rest reach the checks behind the JSON.
    let damage = prop_oneof![
        3 => (prop::collection::vec(json_mut(), 1..3), Just(Vec::new())),
        1 => (
            prop::collection::vec(json_mut(), 0..3),
            prop::collection::vec(byte_mut(), 1..3)
        ),
    ];
    (any::<Index>(), damage, prop::bool::weighted(0.8)).prop_map(|(base, (json, bytes), pad)| {
        Case {
            base,
            json,
            pad,
            bytes,
        }
    })
}

fn tensor_names(root: &Map<String, Value>) -> Vec<String> {
    root.keys()
        .filter(|k| k.as_str() != "__metadata__")
        .cloned()
        .collect()
}

fn pick(names: &[String], i: &Index) -> Option<String> {
    (!names.is_empty()).then(|| names[i.index(names.len())].clone())
}

/// The description of the tensor `i` picks, when it is an object.
fn tensor_mut<'a>(
    obj: &'a mut Map<String, Value>,
    names: &[String],
    i: &Index,
) -> Option<&'a mut Map<String, Value>> {
    obj.get_mut(&pick(names, i)?)?.as_object_mut()
}

/// Applies one mutation; returns the replacement text for [`JsonMut::RootText`].
fn apply_json(root: &mut Value, m: &JsonMut) -> Option<String> {
    let Value::Object(obj) = root else {
        return None;
    };
    let names = tensor_names(obj);
    match m {
        JsonMut::Field {
            tensor,
            field,
            value,
        } => {
            if let Some(d) = tensor_mut(obj, &names, tensor) {
                d.insert(field.to_string(), value.clone());
            }
        }
        JsonMut::Offsets { tensor, start, end } => {
            if let Some(d) = tensor_mut(obj, &names, tensor) {
                d.insert("data_offsets".into(), Value::from(vec![*start, *end]));
            }
        }
        JsonMut::Shift { tensor, delta } => {
            if let Some(d) = tensor_mut(obj, &names, tensor) {
                let offsets = d
                    .get("data_offsets")
                    .and_then(Value::as_array)
                    .and_then(|a| Some((a.first()?.as_u64()?, a.get(1)?.as_u64()?)));
                if let Some((s, e)) = offsets {
                    let mv = |x: u64| x.checked_add_signed(*delta).unwrap_or(x);
                    d.insert("data_offsets".into(), Value::from(vec![mv(s), mv(e)]));
                }
            }
        }
        JsonMut::Shape { tensor, shape } => {
            if let Some(d) = tensor_mut(obj, &names, tensor) {
                d.insert("shape".into(), Value::from(shape.clone()));
            }
        }
        JsonMut::Dtype { tensor, name } => {
            if let Some(d) = tensor_mut(obj, &names, tensor) {
                d.insert("dtype".into(), Value::from(name.as_str()));
            }
        }
        JsonMut::Remove { tensor, field } => {
            if let Some(d) = tensor_mut(obj, &names, tensor) {
                d.remove(*field);
            }
        }
        JsonMut::Tensor { tensor, value } => {
            if let Some(n) = pick(&names, tensor) {
                obj.insert(n, value.clone());
            }
        }
        JsonMut::Add { name, value } => {
            obj.insert(name.clone(), value.clone());
        }
        JsonMut::Rename { tensor, name } => {
            if let Some(v) = pick(&names, tensor).and_then(|n| obj.remove(&n)) {
                obj.insert(name.clone(), v);
            }
        }
        JsonMut::Swap { a, b } => {
            let oa = tensor_mut(obj, &names, a).and_then(|d| d.get("data_offsets").cloned());
            let ob = tensor_mut(obj, &names, b).and_then(|d| d.get("data_offsets").cloned());
            if let (Some(oa), Some(ob)) = (oa, ob) {
                if let Some(d) = tensor_mut(obj, &names, a) {
                    d.insert("data_offsets".into(), ob);
                }
                if let Some(d) = tensor_mut(obj, &names, b) {
                    d.insert("data_offsets".into(), oa);
                }
            }
        }
        JsonMut::Metadata(v) => {
            obj.insert("__metadata__".into(), v.clone());
        }
        JsonMut::MetaEntry { key, value } => {
            if let Some(Value::Object(m)) = obj.get_mut("__metadata__") {
                m.insert(key.clone(), value.clone());
            }
        }
        JsonMut::Root(v) => *root = v.clone(),
        JsonMut::RootText(text) => return Some(text.clone()),
    }
    None
}

/// Serializes JSON, splicing in the raw number texts of [`raw`].
fn serialize(root: &Value) -> String {
    let mut text = root.to_string();
    for n in RAW_NUMBERS {
        text = text.replace(&format!("\"\\u0000RAW:{n}\""), n);
    }
    text
}

fn build(case: &Case) -> Vec<u8> {
    let all = bases();
    let base = &all[case.base.index(all.len())];
    let n = u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    let data = &base[8 + n..];
    let mut header: Value = serde_json::from_slice(&base[8..8 + n]).expect("base header");
    let mut text = None;
    for m in &case.json {
        if let Some(t) = apply_json(&mut header, m) {
            text = Some(t);
        }
    }
    let mut json = text.unwrap_or_else(|| serialize(&header)).into_bytes();
    if case.pad {
        json.resize((8 + json.len()).div_ceil(64) * 64 - 8, b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + data.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(data);
    for m in &case.bytes {
        match m {
            ByteMut::Prefix(v) => {
                if out.len() >= 8 {
                    out[..8].copy_from_slice(&v.to_le_bytes());
                }
            }
            ByteMut::Truncate(at) => out.truncate(at.index(out.len() + 1)),
            ByteMut::Flip { at, mask } => {
                if !out.is_empty() {
                    let i = at.index(out.len());
                    out[i] ^= mask;
                }
            }
            ByteMut::Splice { at, text } => {
                let i = at.index(out.len() + 1);
                out.splice(i..i, text.iter().copied());
            }
            ByteMut::Delete { at, len } => {
                if !out.is_empty() {
                    let i = at.index(out.len());
                    let j = (i + *len as usize).min(out.len());
                    out.drain(i..j);
                }
            }
            ByteMut::Append(tail) => out.extend_from_slice(tail),
        }
    }
    out
}

/// What readers rely on when the parser says yes.
fn check_invariants(h: &Header, file_len: u64) -> Result<(), TestCaseError> {
    prop_assert!(h.data_start >= 8);
    prop_assert_eq!(h.data_start.checked_add(h.data_len), Some(file_len));
    let mut pos = 0u64;
    for t in &h.tensors {
        prop_assert!(t.name != "__metadata__");
        prop_assert_eq!(t.start, pos, "tensors are contiguous, in order");
        prop_assert!(t.start <= t.end && t.end <= h.data_len);
        let size = t.dtype.size() as u64;
        let count = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        prop_assert_eq!(
            count.and_then(|c| c.checked_mul(size)),
            Some(t.end - t.start)
        );
        prop_assert_eq!(
            (h.data_start + t.start) % size,
            0,
            "aligned to its element size"
        );
        let strides = t.shape.iter().try_fold(1i64, |a, &d| {
            i64::try_from(d.max(1)).ok().and_then(|d| a.checked_mul(d))
        });
        prop_assert!(
            strides.is_some(),
            "shape and strides fit i64: {:?}",
            t.shape
        );
        prop_assert!(Dtype::parse(t.dtype.name()) == Some(t.dtype));
        pos = t.end;
    }
    prop_assert_eq!(pos, h.data_len, "no bytes after the last tensor");
    Ok(())
}

/// The verdict on `bytes` as an entry: the header, or the reason it is corrupt. Any other
/// error fails the case.
fn verdict(path: &Path, bytes: &[u8]) -> Result<Result<Header, String>, TestCaseError> {
    match parse_entry_bytes(path, bytes) {
        Ok(h) => {
            check_invariants(&h, bytes.len() as u64)?;
            Ok(Ok(h))
        }
        Err(Error::Corrupt { path: p, reason }) => {
            prop_assert_eq!(p.as_path(), path, "the error names the file");
            prop_assert!(!reason.is_empty());
            Ok(Err(reason))
        }
        Err(other) => Err(TestCaseError::fail(format!(
            "not a corrupt-entry error: {other}"
        ))),
    }
}

fn same_layout(a: &Header, b: &Header) -> bool {
    a.tensors == b.tensors
        && a.metadata == b.metadata
        && a.data_start == b.data_start
        && a.data_len == b.data_len
}

/// Reads the file every way featstore does (header only, mapped, read into memory) and checks
/// all agree with the in-memory parse; verifies the checksum of what opens.
fn check_file(path: &Path, bytes: &[u8]) -> Result<(), TestCaseError> {
    let expected = verdict(path, bytes)?;
    let header = read_header(path);
    let opened = [ReadMode::Map, ReadMode::Pread].map(|m| entry::open_entry(path, m));
    match &expected {
        Ok(h) => {
            prop_assert!(
                matches!(&header, Ok(x) if same_layout(x, h)),
                "read_header disagrees: {:?}",
                header.as_ref().err()
            );
            for e in &opened {
                let Ok(e) = e else {
                    return Err(TestCaseError::fail("open_entry refused what parses"));
                };
                prop_assert!(same_layout(&e.header, h));
                for t in &e.header.tensors {
                    prop_assert_eq!(e.tensor_bytes(t).len() as u64, t.end - t.start);
                }
                match e.verify_checksum(path) {
                    Ok(()) | Err(Error::Corrupt { .. }) => {}
                    Err(other) => {
                        return Err(TestCaseError::fail(format!("checksum: {other}")));
                    }
                }
            }
        }
        Err(_) => {
            prop_assert!(
                matches!(header, Err(Error::Corrupt { .. })),
                "read_header: {:?}",
                header.as_ref().err()
            );
            for e in &opened {
                prop_assert!(
                    matches!(e, Err(Error::Corrupt { .. })),
                    "open_entry: {:?}",
                    e.as_ref().err()
                );
            }
        }
    }
    Ok(())
}

#[test]
fn bases_are_valid() {
    for (i, b) in bases().iter().enumerate() {
        let h =
            parse_entry_bytes(Path::new(FAKE_PATH), b).unwrap_or_else(|e| panic!("base {i}: {e}"));
        check_invariants(&h, b.len() as u64).unwrap();
    }
}

/// Runs a property for `config(divisor)` cases, and leaves its figures in
/// `<target>/tmp/reliability/<name>.json` for the summary table of the Python reliability suite.
fn run_property<S: Strategy>(
    name: &str,
    divisor: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let config = config(divisor);
    let started = Instant::now();
    let result = TestRunner::new(config.clone()).run(&strategy, test);
    let figures = serde_json::json!({
        "cases": config.cases,
        "failures": u32::from(result.is_err()),
        "seconds": started.elapsed().as_secs_f64(),
        "optimized": !cfg!(debug_assertions),
    });
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("reliability");
    // Best effort: the figures are a report, the assertion below is the test.
    let _ = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join(format!("{name}.json")), figures.to_string()));
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

/// The million-case property: damaged entries, parsed in memory.
#[test]
fn damaged_entries_are_refused_or_sound() {
    run_property("header_fuzz_memory", 1, case(), |case| {
        let _ = verdict(Path::new(FAKE_PATH), &build(&case))?;
        Ok(())
    });
}

/// The same damage on disk, read every way: header only, mapped, read into memory.
#[test]
fn damaged_files_read_the_same_every_way() {
    // In memory where there is a tmpfs: this checks the readers, not the disk (rewriting a file
    // on a disk mounted with `discard` costs milliseconds).
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let path = dir.path().join("img.jpg.vggt.safetensors");
    run_property("header_fuzz_files", 50, case(), |case| {
        let bytes = build(&case);
        // Rewritten in place: nothing maps the file between cases (check_file drops its entries).
        std::fs::write(&path, &bytes).unwrap();
        check_file(&path, &bytes)
    });
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// Replays the corpus: `valid-*` files parse and pass their checksum, `damaged-*` parse but
/// fail it (data changed after writing), `corrupt-*` are refused as corrupt.
#[test]
fn corpus_replays() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("tests/corpus exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .collect();
    files.sort();
    assert!(files.len() >= 30, "corpus has only {} files", files.len());
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(path).unwrap();
        check_file(path, &bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let parsed = parse_entry_bytes(path, &bytes);
        let checksum =
            entry::open_entry(path, ReadMode::Pread).and_then(|e| e.verify_checksum(path));
        if name.starts_with("valid-") {
            assert!(
                parsed.is_ok() && checksum.is_ok(),
                "{name}: {parsed:?} {checksum:?}"
            );
        } else if name.starts_with("damaged-") {
            assert!(
                parsed.is_ok() && matches!(checksum, Err(Error::Corrupt { .. })),
                "{name}: {checksum:?}"
            );
        } else if name.starts_with("corrupt-") {
            assert!(
                matches!(parsed, Err(Error::Corrupt { .. })),
                "{name}: parsed as {parsed:?}"
            );
        } else {
            panic!("{name}: corpus files are named valid-*, damaged-* or corrupt-*");
        }
    }
}
