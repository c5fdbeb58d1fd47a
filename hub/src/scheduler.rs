//! Load-balancing choices and dependency rules, as pure functions.
//!
//! The choice functions mirror ipyparallel's `task_scheduler.py`: they receive
//! the loads of the candidate engines in LRU order (least recently used
//! first) and return an index into that slice. Randomness comes from the
//! caller so the hub core stays deterministic under test.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::str::FromStr;
use std::sync::Arc;

use parallax_wire::content::Dependency;

/// Task scheduling scheme (`--scheme`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Lowest load; ties go to the least recently used engine.
    LeastLoad,
    /// Least recently used engine.
    Lru,
    /// Uniformly random engine.
    PlainRandom,
    /// The LRU of two random picks.
    TwoBin,
    /// Two picks weighted by inverse load; the lighter one wins.
    Weighted,
    /// Round-robin with no dependencies, retries, timeouts, targets or HWM
    /// (ipyparallel's pure-zmq DEALER scheduler).
    Pure,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::LeastLoad => "leastload",
            Scheme::Lru => "lru",
            Scheme::PlainRandom => "plainrandom",
            Scheme::TwoBin => "twobin",
            Scheme::Weighted => "weighted",
            Scheme::Pure => "pure",
        }
    }

    pub const ALL: [Scheme; 6] = [
        Scheme::LeastLoad,
        Scheme::Lru,
        Scheme::PlainRandom,
        Scheme::TwoBin,
        Scheme::Weighted,
        Scheme::Pure,
    ];
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scheme {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Scheme::ALL
            .iter()
            .copied()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Scheme::ALL.iter().map(|x| x.name()).collect();
                format!("unknown scheme {s:?}; choose one of {}", names.join(", "))
            })
    }
}

/// A source of uniform random numbers in `[0, 1)`.
pub trait Random {
    fn next_f64(&mut self) -> f64;
    /// Uniform integer in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        ((self.next_f64() * n as f64) as usize).min(n - 1)
    }
}

impl<R: rand::Rng> Random for R {
    fn next_f64(&mut self) -> f64 {
        self.random::<f64>()
    }
}

/// Choose an index into `loads` (LRU order, non-empty) with `scheme`.
/// `Pure` never reaches here: it is plain round-robin in the core.
pub fn choose(scheme: Scheme, loads: &[u32], rng: &mut dyn Random) -> usize {
    debug_assert!(!loads.is_empty());
    let n = loads.len();
    match scheme {
        Scheme::LeastLoad | Scheme::Pure => leastload(loads),
        Scheme::Lru => 0,
        Scheme::PlainRandom => rng.below(n),
        Scheme::TwoBin => {
            let a = rng.below(n);
            let b = rng.below(n);
            a.min(b)
        }
        Scheme::Weighted => weighted(loads, rng.next_f64(), rng.next_f64()),
    }
}

/// First index of the minimum load.
pub fn leastload(loads: &[u32]) -> usize {
    let mut best = 0;
    for (i, &l) in loads.iter().enumerate() {
        if l < loads[best] {
            best = i;
        }
    }
    best
}

/// ipyparallel's `weighted`: weights `1/(1e-6+load)`, two draws `x`, `y` in
/// `[0,1)` scaled to the total weight; the heavier-weighted draw wins.
pub fn weighted(loads: &[u32], x: f64, y: f64) -> usize {
    let weights: Vec<f64> = loads.iter().map(|&l| 1.0 / (1e-6 + l as f64)).collect();
    let mut sums = Vec::with_capacity(weights.len());
    let mut acc = 0.0;
    for w in &weights {
        acc += w;
        sums.push(acc);
    }
    let t = acc;
    let pick = |u: f64| {
        let target = u * t;
        sums.iter()
            .position(|&s| s >= target)
            .unwrap_or(sums.len() - 1)
    };
    let (ix, iy) = (pick(x), pick(y));
    if weights[iy] > weights[ix] { iy } else { ix }
}

/// What the scheduler knows about a finished task: did it succeed, and on
/// which engine did it run. Engine names are shared (`Arc<str>`), so an
/// outcome costs a few bytes however many tasks an engine ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub success: bool,
    pub engine: Arc<str>,
}

impl Outcome {
    pub fn new(success: bool, engine: &str) -> Self {
        Outcome {
            success,
            engine: Arc::from(engine),
        }
    }
}

/// The finished tasks the scheduler remembers for dependencies: the newest
/// `cap` of them. Keys are 64-bit keyed hashes of the msg_ids (randomly keyed
/// per hub, so collisions can neither happen by chance nor be arranged),
/// which keeps 32k remembered tasks near 1 MiB.
#[derive(Debug)]
pub struct DoneSet {
    map: HashMap<u64, Outcome>,
    order: VecDeque<u64>,
    cap: usize,
    hasher: RandomState,
}

impl DoneSet {
    pub fn new(cap: usize) -> Self {
        DoneSet {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
            hasher: RandomState::new(),
        }
    }

    fn key(&self, msg_id: &str) -> u64 {
        self.hasher.hash_one(msg_id)
    }

    pub fn get(&self, msg_id: &str) -> Option<&Outcome> {
        self.map.get(&self.key(msg_id))
    }

    pub fn contains_key(&self, msg_id: &str) -> bool {
        self.map.contains_key(&self.key(msg_id))
    }

    /// Remember an outcome (the first one recorded for a msg_id wins).
    pub fn insert(&mut self, msg_id: &str, outcome: Outcome) {
        let k = self.key(msg_id);
        if let std::collections::hash_map::Entry::Vacant(v) = self.map.entry(k) {
            v.insert(outcome);
            self.order.push_back(k);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// `Dependency.check`: is the dependency met given the finished tasks?
/// With `on_engine`, only tasks that ran on that engine count (`follow`).
pub fn dep_met(dep: &Dependency, done: &DoneSet, on_engine: Option<&str>) -> bool {
    if dep.ids.is_empty() {
        return true;
    }
    let counts = |id: &String| match done.get(id) {
        Some(o) => {
            on_engine.is_none_or(|e| &*o.engine == e)
                && ((dep.success && o.success) || (dep.failure && !o.success))
        }
        None => false,
    };
    if dep.all {
        dep.ids.iter().all(counts)
    } else {
        dep.ids.iter().any(counts)
    }
}

/// `Dependency.unreachable`: can the dependency never be met any more?
pub fn dep_unreachable(dep: &Dependency, done: &DoneSet) -> bool {
    if dep.ids.is_empty() {
        return false;
    }
    let blocks = |id: &String| match done.get(id) {
        Some(o) => (!dep.success && o.success) || (!dep.failure && !o.success),
        None => false,
    };
    if dep.all {
        dep.ids.iter().any(blocks)
    } else {
        dep.ids.iter().all(blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Seq(Vec<f64>, usize);
    impl Random for Seq {
        fn next_f64(&mut self) -> f64 {
            let v = self.0[self.1 % self.0.len()];
            self.1 += 1;
            v
        }
    }

    #[test]
    fn schemes_follow_ipyparallel_rules() {
        let loads = [2, 0, 1, 0];
        let mut r = Seq(vec![0.9, 0.3], 0);
        assert_eq!(choose(Scheme::LeastLoad, &loads, &mut r), 1);
        assert_eq!(choose(Scheme::Lru, &loads, &mut r), 0);
        // plainrandom: 0.9*4 -> 3
        assert_eq!(
            choose(Scheme::PlainRandom, &[0, 0, 0, 0], &mut Seq(vec![0.9], 0)),
            3
        );
        // twobin: min(3, 1)
        assert_eq!(
            choose(Scheme::TwoBin, &loads, &mut Seq(vec![0.9, 0.3], 0)),
            1
        );
        // weighted: the idle engines dominate the weight
        let w = choose(Scheme::Weighted, &loads, &mut Seq(vec![0.2, 0.9], 0));
        assert!(loads[w] == 0, "weighted picked a loaded engine: {w}");
    }

    #[test]
    fn leastload_ties_go_to_lru() {
        assert_eq!(leastload(&[1, 1, 1]), 0);
        assert_eq!(leastload(&[3, 1, 1]), 1);
    }

    #[test]
    fn weighted_prefers_lighter_of_two() {
        // draws land in engine 0 (load 5) and engine 1 (load 0): engine 1 wins
        let loads = [5, 0];
        // weights: 0.2, 1e6 -> sums 0.2, ~1e6. x tiny -> idx 0; y large -> idx 1
        assert_eq!(weighted(&loads, 1e-9, 0.5), 1);
        assert_eq!(weighted(&loads, 0.5, 1e-9), 1);
    }

    #[test]
    fn scheme_names_parse() {
        for s in Scheme::ALL {
            assert_eq!(s.name().parse::<Scheme>().unwrap(), s);
        }
        assert!(
            "fastest"
                .parse::<Scheme>()
                .unwrap_err()
                .contains("leastload")
        );
    }

    fn dep(ids: &[&str], all: bool, success: bool, failure: bool) -> Dependency {
        Dependency {
            ids: ids.iter().map(|s| s.to_string()).collect(),
            all,
            success,
            failure,
        }
    }

    #[test]
    fn done_set_is_bounded_and_first_outcome_wins() {
        let mut d = DoneSet::new(3);
        for i in 0..10 {
            d.insert(&format!("m{i}"), Outcome::new(true, "e"));
        }
        assert_eq!(d.len(), 3);
        assert!(!d.contains_key("m0") && d.contains_key("m9"));
        d.insert("m9", Outcome::new(false, "x"));
        assert_eq!(d.get("m9"), Some(&Outcome::new(true, "e")));
    }

    #[test]
    fn dependency_rules() {
        let mut done = DoneSet::new(16);
        done.insert("a", Outcome::new(true, "e0"));
        done.insert("b", Outcome::new(false, "e1"));
        // after success of a: met
        assert!(dep_met(&dep(&["a"], true, true, false), &done, None));
        // after a and b (success only): b failed -> unreachable
        let d = dep(&["a", "b"], true, true, false);
        assert!(!dep_met(&d, &done, None));
        assert!(dep_unreachable(&d, &done));
        // failure allowed -> met
        assert!(dep_met(&dep(&["a", "b"], true, true, true), &done, None));
        // any: a is enough
        assert!(dep_met(&dep(&["a", "c"], false, true, false), &done, None));
        // only failures count: a succeeded -> unreachable with all
        assert!(dep_unreachable(&dep(&["a"], true, false, true), &done));
        // follow: a ran on e0
        assert!(dep_met(&dep(&["a"], true, true, false), &done, Some("e0")));
        assert!(!dep_met(&dep(&["a"], true, true, false), &done, Some("e1")));
        // pending ids are neither met nor unreachable
        let p = dep(&["zz"], true, true, false);
        assert!(!dep_met(&p, &done, None) && !dep_unreachable(&p, &done));
    }
}
