//! Server selection: weighted smooth round robin, weighted least connections,
//! power-of-two-choices random and consistent hashing (a ketama-style ring). Health, admin
//! state, ejection and runtime weights are read from each server's live state at pick time.
//!
//! Written by hand: tower's balancers are unweighted p2c over a discovered set, and none of
//! them offers smooth WRR, weighted least-conn or a stable hash ring with runtime weights.

use crate::state::ServerState;
use parking_lot::Mutex;
use portcullis_config::{Balance, HashOn};
use rand::Rng;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What the balancer needs to know about one server.
pub struct Slot {
    pub name: String,
    pub weight: u32,
    pub state: Arc<ServerState>,
}

impl Slot {
    fn weight(&self) -> u64 {
        self.state.weight_override().unwrap_or(self.weight) as u64
    }
}

pub struct Balancer {
    algo: Balance,
    current: Mutex<Vec<i64>>,
    rotor: AtomicUsize,
    /// Sorted (point, server index) pairs for consistent hashing.
    ring: Vec<(u64, usize)>,
}

/// Points on the ring per unit of weight: enough for an even spread with a handful of servers.
const POINTS_PER_WEIGHT: u32 = 160;

impl Balancer {
    pub fn new(algo: Balance, slots: &[Slot]) -> Balancer {
        let mut ring = Vec::new();
        if matches!(algo, Balance::Hash(_)) {
            for (i, s) in slots.iter().enumerate() {
                for v in 0..s.weight.min(100) * POINTS_PER_WEIGHT {
                    ring.push((hash64(format!("{}#{v}", s.name).as_bytes()), i));
                }
            }
            ring.sort_unstable();
        }
        Balancer {
            algo,
            current: Mutex::new(vec![0; slots.len()]),
            rotor: AtomicUsize::new(0),
            ring,
        }
    }

    pub fn hash_on(&self) -> Option<&HashOn> {
        match &self.algo {
            Balance::Hash(h) => Some(h),
            _ => None,
        }
    }

    /// Picks a server index. `key` is the request's hash key (for `hash`). Servers in
    /// `tried` are avoided while any other server is available.
    pub fn pick(&self, slots: &[Slot], key: Option<u64>, tried: &[usize]) -> Option<usize> {
        let eligible = |i: usize| slots[i].state.available() && slots[i].weight() > 0;
        let fresh = |i: usize| eligible(i) && !tried.contains(&i);
        if let Some(i) = self.pick_where(slots, key, &fresh) {
            return Some(i);
        }
        self.pick_where(slots, key, &eligible)
    }

    fn pick_where(
        &self,
        slots: &[Slot],
        key: Option<u64>,
        ok: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        match &self.algo {
            Balance::RoundRobin => self.smooth_wrr(slots, ok),
            Balance::LeastConn => self.least_conn(slots, ok),
            Balance::Random => self.p2c(slots, ok),
            Balance::Hash(_) => match key {
                Some(k) => self.ring_lookup(k, ok),
                None => self.smooth_wrr(slots, ok),
            },
        }
    }

    /// nginx's smooth weighted round robin: spreads heavy servers out instead of bursting.
    fn smooth_wrr(&self, slots: &[Slot], ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let mut cw = self.current.lock();
        if cw.len() != slots.len() {
            cw.resize(slots.len(), 0);
        }
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, s) in slots.iter().enumerate() {
            if !ok(i) {
                continue;
            }
            let w = s.weight() as i64;
            cw[i] += w;
            total += w;
            if best.is_none_or(|b| cw[i] > cw[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        cw[b] -= total;
        Some(b)
    }

    /// Fewest in-flight requests relative to weight; ties rotate.
    fn least_conn(&self, slots: &[Slot], ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = slots.len();
        let start = self.rotor.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, u64, u64)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if !ok(i) {
                continue;
            }
            let load = slots[i].state.active.load(Ordering::Relaxed) as u64 + 1;
            let w = slots[i].weight();
            // load_i / w_i < load_b / w_b  <=>  load_i * w_b < load_b * w_i
            if best.is_none_or(|(_, bl, bw)| load * bw < bl * w) {
                best = Some((i, load, w));
            }
        }
        best.map(|b| b.0)
    }

    /// Two weighted random choices; the less loaded one wins.
    fn p2c(&self, slots: &[Slot], ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let total: u64 = (0..slots.len())
            .filter(|&i| ok(i))
            .map(|i| slots[i].weight())
            .sum();
        if total == 0 {
            return None;
        }
        let mut rng = rand::rng();
        let mut draw = || {
            let mut r = rng.random_range(0..total);
            for (i, s) in slots.iter().enumerate() {
                if !ok(i) {
                    continue;
                }
                let w = s.weight();
                if r < w {
                    return i;
                }
                r -= w;
            }
            unreachable!("r < total")
        };
        let (a, b) = (draw(), draw());
        let la = (slots[a].state.active.load(Ordering::Relaxed) as u64 + 1) * slots[b].weight();
        let lb = (slots[b].state.active.load(Ordering::Relaxed) as u64 + 1) * slots[a].weight();
        Some(if lb < la { b } else { a })
    }

    fn ring_lookup(&self, key: u64, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        if self.ring.is_empty() {
            return None;
        }
        let start = self.ring.partition_point(|(p, _)| *p < key);
        let n = self.ring.len();
        (0..n)
            .map(|k| self.ring[(start + k) % n].1)
            .find(|&i| ok(i))
    }
}

/// FNV-1a followed by murmur3's 64-bit finalizer: stable across runs and builds (unlike
/// std's hasher), cheap, and well mixed for ring placement. Too small to warrant a crate.
pub fn hash64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{AdminState, StateRegistry};

    fn slots(weights: &[u32]) -> Vec<Slot> {
        let reg = StateRegistry::default();
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| Slot {
                name: format!("s{i}"),
                weight: *w,
                state: reg.server(&format!("b/s{i}"), "x:1"),
            })
            .collect()
    }

    #[test]
    fn smooth_wrr_follows_weights_and_interleaves() {
        let s = slots(&[5, 1, 1]);
        let b = Balancer::new(Balance::RoundRobin, &s);
        let seq: Vec<usize> = (0..7).map(|_| b.pick(&s, None, &[]).unwrap()).collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn unavailable_servers_are_skipped() {
        let s = slots(&[1, 1]);
        s[0].state.set_admin_state(AdminState::Maint);
        let b = Balancer::new(Balance::RoundRobin, &s);
        assert!((0..10).all(|_| b.pick(&s, None, &[]) == Some(1)));
        s[1].state.set_healthy(false);
        assert_eq!(b.pick(&s, None, &[]), None);
    }

    #[test]
    fn tried_servers_are_avoided_when_possible() {
        let s = slots(&[1, 1]);
        let b = Balancer::new(Balance::LeastConn, &s);
        assert!((0..10).all(|_| b.pick(&s, None, &[0]) == Some(1)));
        assert!(b.pick(&s, None, &[0, 1]).is_some());
    }

    #[test]
    fn least_conn_prefers_idle() {
        let s = slots(&[1, 1, 1]);
        s[0].state.active.store(5, Ordering::Relaxed);
        s[2].state.active.store(2, Ordering::Relaxed);
        let b = Balancer::new(Balance::LeastConn, &s);
        assert_eq!(b.pick(&s, None, &[]), Some(1));
    }

    #[test]
    fn ring_moves_about_one_in_n_plus_one() {
        let four = slots(&[1, 1, 1, 1]);
        let five = slots(&[1, 1, 1, 1, 1]);
        let h = Balance::Hash(HashOn::Path);
        let b4 = Balancer::new(h.clone(), &four);
        let b5 = Balancer::new(h, &five);
        let keys = 20_000;
        let moved = (0..keys)
            .filter(|k| {
                let key = hash64(format!("/user/{k}").as_bytes());
                b4.pick(&four, Some(key), &[]) != b5.pick(&five, Some(key), &[])
            })
            .count();
        let frac = moved as f64 / keys as f64;
        assert!((0.12..0.28).contains(&frac), "moved {frac}");
    }
}
