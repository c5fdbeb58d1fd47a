//! Stable-toolchain smoke fuzzing of the receive path.
//!
//! Runs the cargo-fuzz harness (`fuzz/src/lib.rs`, included below so both
//! run the same code) on deterministic pseudo-random mutations of the golden
//! captures: byte edits, frame edits, structured JSON edits of the four JSON
//! frames, optional re-signing, and plain random bytes. The harness panics
//! on any broken invariant; a panic here prints the input in cargo-fuzz's
//! format so it can be replayed with `cargo fuzz run decode <file>`.
//!
//! Iterations: 200 000 in release builds (2–5 s on an idle machine), 10 000
//! in debug builds, stopping early (after at least 10 000) if a busy machine
//! makes the run exceed 8 s. `PARALLAX_FUZZ_ITERS` sets an exact count with
//! no time limit; `PARALLAX_FUZZ_SEED` picks another input sequence.

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod harness;

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::time::{Duration, Instant};

use bytes::Bytes;
use harness::{CTRL_SMALL_LIMITS, FUZZ_KEY, Outcome, encode_input};
use parallax_wire::{DELIMITER, Signer};
use serde_json::{Map, Value};

/// SplitMix64: small, fast, and deterministic across platforms.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn hex_frames(v: &Value) -> Vec<Bytes> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|f| Bytes::from(hex::decode(f.as_str().unwrap()).unwrap()))
        .collect()
}

/// Frames of every golden capture and every message our serializer emitted.
fn seeds() -> Vec<Vec<Bytes>> {
    let mut out = Vec::new();
    for text in [
        include_str!("data/golden.json"),
        include_str!("data/rust_emitted.json"),
    ] {
        let doc: Value = serde_json::from_str(text).unwrap();
        for m in doc["messages"].as_array().unwrap() {
            out.push(hex_frames(&m["frames"]));
        }
    }
    out
}

const KEYS: &[&str] = &[
    "targets",
    "retries",
    "timeout",
    "after",
    "follow",
    "dependencies",
    "all",
    "success",
    "failure",
    "msg_id",
    "msg_type",
    "msg_ids",
    "uuid",
    "id",
    "query",
    "keys",
    "engine_ids",
    "status",
    "ename",
    "evalue",
    "traceback",
    "engine_info",
    "date",
    "session",
    "username",
    "version",
    "label",
    "verbose",
    "status_only",
];

const STRINGS: &[&str] = &[
    "",
    "all",
    "a",
    "é✓🚀",
    "\u{0}",
    "\\\"",
    "\u{fffd}",
    "2026-01-02T03:04:05.123456Z",
    "<IDS|MSG>",
    "4f0e8c1a-3b2d-4e5f-9a6b-7c8d9e0f1a2b",
];

fn random_number(rng: &mut Rng) -> Value {
    let n: serde_json::Number = match rng.below(10) {
        0 => 0.into(),
        1 => (-1).into(),
        2 => u64::MAX.into(),
        3 => i64::MIN.into(),
        4 => (u64::from(u32::MAX) + 1).into(),
        5 => serde_json::Number::from_f64(-0.0).unwrap(),
        6 => serde_json::Number::from_f64(f64::MAX).unwrap(),
        7 => serde_json::Number::from_f64(5e-324).unwrap(),
        8 => serde_json::Number::from_f64(rng.next() as f64 / 1e9 - 9e9).unwrap(),
        _ => (rng.next() % 1000).into(),
    };
    Value::Number(n)
}

fn random_value(rng: &mut Rng, depth: u32) -> Value {
    let kinds = if depth >= 3 { 5 } else { 7 };
    match rng.below(kinds) {
        0 => Value::Null,
        1 => Value::Bool(rng.chance(50)),
        2 => random_number(rng),
        3 | 4 => Value::String((*rng.pick(STRINGS)).to_owned()),
        5 => {
            let n = rng.below(4);
            Value::Array((0..n).map(|_| random_value(rng, depth + 1)).collect())
        }
        _ => {
            let n = rng.below(4);
            Value::Object(
                (0..n)
                    .map(|_| {
                        let k = (*rng.pick(KEYS)).to_owned();
                        (k, random_value(rng, depth + 1))
                    })
                    .collect::<Map<_, _>>(),
            )
        }
    }
}

/// Replace, insert or delete at a random place in a JSON tree.
fn mutate_value(rng: &mut Rng, v: &mut Value, depth: u32) {
    let descend = rng.chance(60);
    match v {
        Value::Object(m) if descend && !m.is_empty() => {
            let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
            mutate_value(rng, m.get_mut(&k).unwrap(), depth + 1);
        }
        Value::Array(a) if descend && !a.is_empty() => {
            let i = rng.below(a.len());
            mutate_value(rng, &mut a[i], depth + 1);
        }
        Value::Object(m) => match rng.below(3) {
            0 => {
                m.insert((*rng.pick(KEYS)).to_owned(), random_value(rng, depth));
            }
            1 if !m.is_empty() => {
                let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
                m.remove(&k);
            }
            _ => *v = random_value(rng, depth),
        },
        Value::Array(a) if rng.chance(50) => a.push(random_value(rng, depth + 1)),
        _ => *v = random_value(rng, depth),
    }
}

const INTERESTING: &[u8] = b"\x00\xff\x80\x7f\"{}[],:\\0123456789.eE-+ntfu\n";

fn mutate_bytes(rng: &mut Rng, f: &mut Vec<u8>) {
    let len = f.len();
    match rng.below(7) {
        0 if len > 0 => {
            let i = rng.below(len);
            f[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            f[i] = *rng.pick(INTERESTING);
        }
        2 => {
            let i = rng.below(len + 1);
            let n = 1 + rng.below(4);
            for _ in 0..n {
                f.insert(i, *rng.pick(INTERESTING));
            }
        }
        3 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(16));
            f.drain(i..i + n);
        }
        4 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(16));
            let chunk = f[i..i + n].to_vec();
            let at = rng.below(len + 1);
            f.splice(at..at, chunk);
        }
        5 => f.truncate(rng.below(len + 1)),
        _ => {
            let i = rng.below(len + 1);
            f.insert(i, rng.next() as u8);
        }
    }
}

fn delimiter_at(frames: &[Bytes]) -> Option<usize> {
    frames.iter().position(|f| f.as_ref() == DELIMITER)
}

fn mutate_frames(rng: &mut Rng, frames: &mut Vec<Bytes>, seeds: &[Vec<Bytes>]) {
    let n = frames.len();
    match rng.below(14) {
        // Structured JSON edits: the most productive for decode coverage.
        0..=6 => {
            if let Some(d) = delimiter_at(frames)
                && d + 6 <= n
            {
                let i = d + 2 + rng.below(4);
                if let Ok(mut v) = serde_json::from_slice::<Value>(&frames[i]) {
                    mutate_value(rng, &mut v, 0);
                    let text = if rng.chance(20) {
                        serde_json::to_vec_pretty(&v)
                    } else {
                        serde_json::to_vec(&v)
                    };
                    frames[i] = Bytes::from(text.unwrap());
                }
            }
        }
        7..=10 if n > 0 => {
            let i = rng.below(n);
            let mut f = frames[i].to_vec();
            for _ in 0..1 + rng.below(3) {
                mutate_bytes(rng, &mut f);
            }
            frames[i] = Bytes::from(f);
        }
        9 if n > 0 => {
            frames.remove(rng.below(n));
        }
        10 if n > 0 => {
            let f = frames[rng.below(n)].clone();
            frames.insert(rng.below(n + 1), f);
        }
        11 if n > 1 => {
            let (a, b) = (rng.below(n), rng.below(n));
            frames.swap(a, b);
        }
        12 => {
            let f = if rng.chance(50) {
                Bytes::from_static(DELIMITER)
            } else {
                Bytes::new()
            };
            frames.insert(rng.below(n + 1), f);
        }
        _ => {
            let other = rng.pick(seeds);
            if !other.is_empty() && n > 0 {
                frames[rng.below(n)] = rng.pick(other).clone();
            }
        }
    }
}

/// Give the message a valid signature for the harness key, if it has one.
fn resign(frames: &mut [Bytes]) {
    if let Some(d) = delimiter_at(frames)
        && d + 6 <= frames.len()
    {
        let sig = Signer::new(FUZZ_KEY).sign(
            &frames[d + 2],
            &frames[d + 3],
            &frames[d + 4],
            &frames[d + 5],
        );
        frames[d + 1] = Bytes::from(sig);
    }
}

fn one_input(rng: &mut Rng, seeds: &[Vec<Bytes>]) -> Vec<u8> {
    if rng.chance(3) {
        // Plain random bytes for the input splitter itself.
        let n = rng.below(64);
        return (0..n).map(|_| rng.next() as u8).collect();
    }
    let mut frames = rng.pick(seeds).clone();
    for _ in 0..1 + rng.below(3) {
        mutate_frames(rng, &mut frames, seeds);
    }
    if rng.chance(40) {
        resign(&mut frames);
    }
    let ctrl = if rng.chance(15) { CTRL_SMALL_LIMITS } else { 0 };
    let mut input = encode_input(ctrl, &frames);
    if rng.chance(5) && !input.is_empty() {
        // Damage the encoding itself (lengths, control byte).
        mutate_bytes(rng, &mut input);
    }
    input
}

#[test]
fn smoke_fuzz_decode_path() {
    const MIN_ITERS: u64 = 10_000;
    let fixed = env_u64("PARALLAX_FUZZ_ITERS");
    let iters = fixed.unwrap_or(if cfg!(debug_assertions) {
        MIN_ITERS
    } else {
        200_000
    });
    let budget = Duration::from_secs(8);
    let seed = env_u64("PARALLAX_FUZZ_SEED").unwrap_or(0x5eed_f0f0_9a4a_11a8);
    let seeds = seeds();
    let mut rng = Rng(seed);
    let mut outcomes: HashMap<Outcome, u64> = HashMap::new();
    let started = Instant::now();

    // The unmutated seeds first: all of them must decode, validly signed.
    for frames in &seeds {
        let outcome = harness::run(&encode_input(0, frames));
        assert_eq!(outcome, Outcome::DecodedSigned);
    }

    let mut ran = 0;
    for i in 0..iters {
        if fixed.is_none() && i >= MIN_ITERS && i % 1000 == 0 && started.elapsed() > budget {
            break;
        }
        ran += 1;
        let input = one_input(&mut rng, &seeds);
        match catch_unwind(AssertUnwindSafe(|| harness::run(&input))) {
            Ok(outcome) => *outcomes.entry(outcome).or_default() += 1,
            Err(panic) => {
                let path = std::env::temp_dir().join(format!("parallax-fuzz-crash-{seed}-{i}"));
                let _ = std::fs::write(&path, &input);
                eprintln!(
                    "smoke fuzz: iteration {i} (PARALLAX_FUZZ_SEED={seed}) panicked; \
                     input written to {} (replay: cargo fuzz run decode <file>)\ninput hex: {}",
                    path.display(),
                    hex::encode(&input)
                );
                resume_unwind(panic);
            }
        }
    }

    let count = |o| outcomes.get(&o).copied().unwrap_or(0);
    let decoded = count(Outcome::DecodedSigned) + count(Outcome::DecodedBadSignature);
    eprintln!(
        "smoke fuzz: {ran} of {iters} inputs in {:.2?}: {outcomes:?}",
        started.elapsed()
    );
    // The mutator must keep reaching every stage, or the test proves little.
    if ran >= 10_000 {
        for o in [
            Outcome::NotSplit,
            Outcome::NotDecoded,
            Outcome::DecodedBadSignature,
            Outcome::DecodedSigned,
        ] {
            assert!(
                count(o) * 50 >= iters,
                "{o:?} reached only {} times",
                count(o)
            );
        }
        assert!(decoded * 4 >= iters, "only {decoded} inputs decoded");
    }
}

/// Writes the seeds in cargo-fuzz's input format to `fuzz/corpus/decode/`:
/// `cargo test -p parallax-wire --test fuzz_smoke -- --ignored write_seed_corpus`.
#[test]
#[ignore = "writes files; run by hand before cargo fuzz"]
fn write_seed_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/decode");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, frames) in seeds().iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:02}")), encode_input(0, frames)).unwrap();
        std::fs::write(
            dir.join(format!("seed-{i:02}-small")),
            encode_input(CTRL_SMALL_LIMITS, frames),
        )
        .unwrap();
    }
}
