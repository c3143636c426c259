//! Pure bidding logic: given a call for bids and the agent's *real* local state (NVML
//! readings, health events, reservations, running jobs), offer specific GPUs at a price
//! with a tentative reservation, or decline with a reason. No I/O; `now` is passed in.
//!
//! Invariant: a GPU is offered to at most one auction at a time. An offer reserves its
//! GPUs until the lease expires or the auction is settled ([`LocalState::release`]).

use serde::{Deserialize, Serialize};

/// A GPU with a fatal event (XID, double-bit ECC) this recently is not offered.
pub const HEALTH_WINDOW_MS: u64 = 10 * 60 * 1000;
/// A GPU this hot is not offered.
pub const MAX_TEMPERATURE_C: u32 = 90;
/// Without an explicit `gpu_memory` need, a GPU counts as free only if this share of its
/// memory is actually free per NVML (someone else's process may be using it).
pub const FREE_SHARE_WITHOUT_REQUIREMENT: f64 = 0.9;

/// One GPU as the agent sees it now.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuState {
    pub uuid: String,
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: Option<u64>,
    pub temperature_c: Option<u32>,
    pub ecc_uncorrected_volatile: Option<u64>,
    /// Time of the last XID / double-bit ECC event, ms since the epoch.
    pub last_fatal_event_ms: Option<u64>,
}

/// Slack in CPU sums, so that ten jobs of 0.1 CPU fit one CPU despite rounding.
const CPU_EPSILON: f64 = 1e-9;

/// What one attempt, running or reserved for, holds on this node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hold {
    pub gpus: Vec<String>,
    pub cpus: f64,
    pub memory_bytes: u64,
}

/// A tentative hold for one auction.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub auction: String,
    pub hold: Hold,
    pub expires_at_ms: u64,
}

/// Everything the agent bids from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalState {
    pub gpus: Vec<GpuState>,
    pub reservations: Vec<Reservation>,
    /// What running attempts hold, by `job/attempt`.
    pub running: Vec<(String, Hold)>,
    /// CPUs and memory jobs may use on this node (0: not known, not accounted).
    pub cpus: f64,
    pub memory_bytes: u64,
    pub price_per_hour: f64,
    pub spot: bool,
    pub has_container_runtime: bool,
}

/// What is asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallForBids {
    pub auction: String,
    pub gpus: u32,
    pub gpu_model: Option<String>,
    pub gpu_memory_bytes: Option<u64>,
    pub cpus: f64,
    pub memory_bytes: u64,
    pub needs_container: bool,
    pub expected_duration_ms: u64,
    pub lease_ms: u64,
}

/// An offer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    pub gpus: Vec<String>,
    /// The offered GPUs' health facts (same order).
    pub health: Vec<fleetmesh_protocol::GpuHealth>,
    pub price: f64,
    pub eta_ms: u64,
    pub reserved_until_ms: u64,
    /// Share of the node's CPUs taken once this job runs (0 when not accounted).
    pub load: f64,
}

/// Why the agent declines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Decline {
    NotEnoughFreeGpus { wanted: u32, free: u32, unhealthy: u32 },
    NotEnoughFreeCpus { wanted: String, free: String, total: String },
    NotEnoughFreeMemory { wanted: u64, free: u64, total: u64 },
    NoContainerRuntime,
    AlreadyBidding,
}

impl std::fmt::Display for Decline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decline::NotEnoughFreeGpus { wanted, free, unhealthy } => write!(
                f,
                "{free} free healthy matching GPU(s), {wanted} wanted ({unhealthy} excluded as unhealthy)"
            ),
            Decline::NotEnoughFreeCpus { wanted, free, total } => {
                write!(f, "{free} of {total} CPUs free, job needs {wanted}")
            }
            Decline::NotEnoughFreeMemory { wanted, free, total } => {
                write!(f, "{free} of {total} bytes of memory free, job needs {wanted}")
            }
            Decline::NoContainerRuntime => write!(f, "job needs a container image; no docker or podman here"),
            Decline::AlreadyBidding => write!(f, "already holding a reservation for this auction"),
        }
    }
}

fn healthy(g: &GpuState, now_ms: u64) -> bool {
    let recent_fatal =
        g.last_fatal_event_ms.is_some_and(|t| now_ms.saturating_sub(t) < HEALTH_WINDOW_MS);
    let hot = g.temperature_c.is_some_and(|t| t >= MAX_TEMPERATURE_C);
    let ecc = g.ecc_uncorrected_volatile.is_some_and(|n| n > 0);
    !(recent_fatal || hot || ecc)
}

/// Why an award's GPUs, CPUs or memory cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuTaken {
    #[error("GPU {0} is reserved or running another job")]
    Busy(String),
    #[error("GPU {0} is not on this node")]
    NotHere(String),
    #[error("{0}")]
    NoRoom(String),
}

impl LocalState {
    /// Drop reservations whose lease has passed.
    pub fn expire(&mut self, now_ms: u64) {
        self.reservations.retain(|r| r.expires_at_ms > now_ms);
    }

    /// Release an auction's reservation (lost, or turned into a running attempt).
    pub fn release(&mut self, auction: &str) -> Option<Reservation> {
        let i = self.reservations.iter().position(|r| r.auction == auction)?;
        Some(self.reservations.remove(i))
    }

    /// Take `gpus` for an award of `auction`: its own reservation, or (an award passed
    /// on to this runner-up after its reservation was released) GPUs that nothing else
    /// holds right now. Err names what is in the way.
    pub fn take_for_award(
        &mut self,
        auction: &str,
        hold: &Hold,
        now_ms: u64,
    ) -> Result<(), GpuTaken> {
        self.expire(now_ms);
        let reserved = self.release(auction);
        let reserved_gpus = reserved.as_ref().map(|r| r.hold.gpus.as_slice()).unwrap_or_default();
        for g in hold.gpus.iter().filter(|g| !reserved_gpus.contains(g)) {
            if self.held(g) {
                return Err(GpuTaken::Busy(g.clone()));
            }
            if !self.gpus.iter().any(|x| &x.uuid == g) {
                return Err(GpuTaken::NotHere(g.clone()));
            }
        }
        if reserved.is_none() {
            // Passed on after its reservation went: only what is free now may be taken.
            self.fits(hold.cpus, hold.memory_bytes).map_err(|d| GpuTaken::NoRoom(d.to_string()))?;
        }
        Ok(())
    }

    fn held(&self, uuid: &str) -> bool {
        self.holds().any(|h| h.gpus.iter().any(|g| g == uuid))
    }

    /// Everything held: running attempts and reservations.
    fn holds(&self) -> impl Iterator<Item = &Hold> {
        self.running.iter().map(|(_, h)| h).chain(self.reservations.iter().map(|r| &r.hold))
    }

    /// CPUs and memory not held by anything (when the node's size is known).
    pub fn free_cpus_and_memory(&self) -> (f64, u64) {
        let cpus: f64 = self.holds().map(|h| h.cpus).sum();
        let memory: u64 = self.holds().map(|h| h.memory_bytes).sum();
        ((self.cpus - cpus).max(0.0), self.memory_bytes.saturating_sub(memory))
    }

    /// Whether `cpus` and `memory` fit beside what is held; why not.
    fn fits(&self, cpus: f64, memory: u64) -> Result<(), Decline> {
        let (free_cpus, free_memory) = self.free_cpus_and_memory();
        if self.cpus > 0.0 && cpus > free_cpus + CPU_EPSILON {
            return Err(Decline::NotEnoughFreeCpus {
                wanted: format!("{cpus}"),
                free: format!("{free_cpus:.2}"),
                total: format!("{}", self.cpus),
            });
        }
        if self.memory_bytes > 0 && memory > free_memory {
            return Err(Decline::NotEnoughFreeMemory {
                wanted: memory,
                free: free_memory,
                total: self.memory_bytes,
            });
        }
        Ok(())
    }

    /// Share of the CPUs taken once `cpus` more run.
    fn load_with(&self, cpus: f64) -> f64 {
        if self.cpus <= 0.0 {
            return 0.0;
        }
        let (free, _) = self.free_cpus_and_memory();
        ((self.cpus - free + cpus) / self.cpus).clamp(0.0, 1.0)
    }

    /// Bid for `call`: on success the offered GPUs are reserved until the lease ends.
    pub fn bid(&mut self, call: &CallForBids, now_ms: u64) -> Result<Offer, Decline> {
        self.expire(now_ms);
        if self.reservations.iter().any(|r| r.auction == call.auction) {
            return Err(Decline::AlreadyBidding);
        }
        if call.needs_container && !self.has_container_runtime {
            return Err(Decline::NoContainerRuntime);
        }
        self.fits(call.cpus, call.memory_bytes)?;
        let mut unhealthy = 0u32;
        let mut free: Vec<&GpuState> = Vec::new();
        for g in &self.gpus {
            if self.held(&g.uuid) {
                continue;
            }
            if call
                .gpu_model
                .as_deref()
                .is_some_and(|p| !fleetmesh_protocol::workflow::glob_match(p, &g.name))
            {
                continue;
            }
            let Some(mem_free) = g.memory_free_bytes else { continue };
            let enough = match call.gpu_memory_bytes {
                Some(need) => mem_free >= need,
                None => {
                    mem_free as f64 >= g.memory_total_bytes as f64 * FREE_SHARE_WITHOUT_REQUIREMENT
                }
            };
            if !enough {
                continue;
            }
            if !healthy(g, now_ms) {
                unhealthy += 1;
                continue;
            }
            free.push(g);
        }
        if (free.len() as u32) < call.gpus {
            return Err(Decline::NotEnoughFreeGpus {
                wanted: call.gpus,
                free: free.len() as u32,
                unhealthy,
            });
        }
        let offered = &free[..call.gpus as usize];
        let gpus: Vec<String> = offered.iter().map(|g| g.uuid.clone()).collect();
        let health = offered
            .iter()
            .map(|g| fleetmesh_protocol::GpuHealth {
                uuid: g.uuid.clone(),
                temperature_c: g.temperature_c,
                ecc_uncorrected_volatile: g.ecc_uncorrected_volatile,
                last_fatal_event_ms: g.last_fatal_event_ms,
            })
            .collect();
        let hours = call.expected_duration_ms as f64 / 3_600_000.0;
        let price = self.price_per_hour * hours * f64::from(call.gpus.max(1));
        let reserved_until_ms = now_ms + call.lease_ms;
        let load = self.load_with(call.cpus);
        let hold = Hold { gpus: gpus.clone(), cpus: call.cpus, memory_bytes: call.memory_bytes };
        self.reservations.push(Reservation {
            auction: call.auction.clone(),
            hold,
            expires_at_ms: reserved_until_ms,
        });
        Ok(Offer { gpus, health, price, eta_ms: 0, reserved_until_ms, load })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(i: u32) -> GpuState {
        GpuState {
            uuid: format!("GPU-{i}"),
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 80 << 30,
            memory_free_bytes: Some(79 << 30),
            temperature_c: Some(40),
            ecc_uncorrected_volatile: Some(0),
            last_fatal_event_ms: None,
        }
    }

    fn state(n: u32) -> LocalState {
        LocalState { gpus: (0..n).map(gpu).collect(), price_per_hour: 2.0, ..Default::default() }
    }

    fn call(auction: &str, gpus: u32) -> CallForBids {
        CallForBids {
            auction: auction.into(),
            gpus,
            gpu_model: None,
            gpu_memory_bytes: None,
            cpus: 1.0,
            memory_bytes: 0,
            needs_container: false,
            expected_duration_ms: 1_800_000,
            lease_ms: 2000,
        }
    }

    #[test]
    fn a_gpu_is_never_offered_to_two_auctions() {
        let mut s = state(3);
        let a = s.bid(&call("a", 2), 0).unwrap();
        let b = s.bid(&call("b", 2), 0).unwrap_err();
        assert_eq!(b, Decline::NotEnoughFreeGpus { wanted: 2, free: 1, unhealthy: 0 });
        let c = s.bid(&call("c", 1), 0).unwrap();
        assert!(c.gpus.iter().all(|g| !a.gpus.contains(g)));
        assert_eq!(s.bid(&call("a", 1), 0).unwrap_err(), Decline::AlreadyBidding);
        // The lease runs out: the GPUs are free again.
        assert_eq!(s.bid(&call("d", 3), 2001).unwrap().gpus.len(), 3);
    }

    #[test]
    fn release_and_running_jobs() {
        let mut s = state(2);
        let a = s.bid(&call("a", 2), 0).unwrap();
        let r = s.release("a").unwrap();
        assert_eq!(a.gpus, r.hold.gpus);
        s.running.push(("job-1/1".into(), r.hold));
        assert!(matches!(s.bid(&call("b", 1), 0), Err(Decline::NotEnoughFreeGpus { free: 0, .. })));
    }

    #[test]
    fn memory_actually_free_matters() {
        let mut s = state(2);
        s.gpus[0].memory_free_bytes = Some(20 << 30); // a foreign process holds 60 GiB
        assert!(matches!(s.bid(&call("a", 2), 0), Err(Decline::NotEnoughFreeGpus { free: 1, .. })));
        let mut c = call("b", 2);
        c.gpu_memory_bytes = Some(16 << 30);
        assert_eq!(s.bid(&c, 0).unwrap().gpus.len(), 2, "16 GiB asked, 20 GiB free");
        s.gpus[1].memory_free_bytes = None; // unknown: not offered
        let mut s2 = s.clone();
        s2.reservations.clear();
        assert!(s2.bid(&c, 0).is_err());
    }

    #[test]
    fn unhealthy_gpus_are_excluded() {
        let mut s = state(4);
        s.gpus[0].last_fatal_event_ms = Some(1_000);
        s.gpus[1].temperature_c = Some(95);
        s.gpus[2].ecc_uncorrected_volatile = Some(3);
        let e = s.bid(&call("a", 2), 5_000).unwrap_err();
        assert_eq!(e, Decline::NotEnoughFreeGpus { wanted: 2, free: 1, unhealthy: 3 });
        // The XID is old enough to be forgiven after the health window.
        s.reservations.clear();
        let ok = s.bid(&call("b", 2), 1_000 + HEALTH_WINDOW_MS).unwrap();
        assert!(ok.gpus.contains(&"GPU-0".to_string()));
        // The bid carries the offered GPUs' health facts, in the order of `gpus`.
        let uuids: Vec<&str> = ok.health.iter().map(|h| h.uuid.as_str()).collect();
        assert_eq!(uuids, ok.gpus.iter().map(String::as_str).collect::<Vec<_>>());
        let g0 = ok.health.iter().find(|h| h.uuid == "GPU-0").unwrap();
        assert_eq!(g0.last_fatal_event_ms, Some(1_000), "an old XID is reported, not hidden");
        assert_eq!((g0.temperature_c, g0.ecc_uncorrected_volatile), (Some(40), Some(0)));
    }

    #[test]
    fn model_pattern_container_and_price() {
        let mut s = state(2);
        s.gpus[1].name = "NVIDIA L4".into();
        let mut c = call("a", 1);
        c.gpu_model = Some("*L4*".into());
        let o = s.bid(&c, 0).unwrap();
        assert_eq!(o.gpus, ["GPU-1"]);
        assert!((o.price - 1.0).abs() < 1e-9, "2.0/h x 0.5 h x 1 GPU");
        let mut c = call("b", 1);
        c.needs_container = true;
        assert_eq!(s.bid(&c, 0).unwrap_err(), Decline::NoContainerRuntime);
    }

    fn gpus_only(gpus: &[String]) -> Hold {
        Hold { gpus: gpus.to_vec(), cpus: 0.0, memory_bytes: 0 }
    }

    #[test]
    fn awards_take_their_reservation_or_only_gpus_nothing_else_holds() {
        let mut s = state(2);
        let offer = s.bid(&call("a1", 1), 0).unwrap();
        // Its own reservation.
        assert_eq!(s.take_for_award("a1", &gpus_only(&offer.gpus), 10), Ok(()));
        s.running.push(("j/1".into(), gpus_only(&offer.gpus)));
        // Passed on after the reservation was released: free GPUs are taken, held ones not.
        let other = s.bid(&call("a2", 1), 20).unwrap();
        assert_ne!(other.gpus, offer.gpus);
        let busy = s.take_for_award("gone", &gpus_only(&offer.gpus), 30).unwrap_err();
        assert!(matches!(busy, GpuTaken::Busy(_)) && busy.to_string().contains("running"));
        let busy = s.take_for_award("gone", &gpus_only(&other.gpus), 30).unwrap_err();
        assert!(busy.to_string().contains("reserved"), "{busy}");
        s.release("a2");
        assert_eq!(s.take_for_award("gone", &gpus_only(&other.gpus), 40), Ok(()));
        let e = s.take_for_award("x", &gpus_only(&["GPU-9".to_string()]), 50).unwrap_err();
        assert_eq!(e, GpuTaken::NotHere("GPU-9".into()));
    }

    #[test]
    fn cpus_and_memory_are_never_offered_twice_and_bids_say_how_loaded_the_node_gets() {
        let mut s = LocalState { cpus: 4.0, memory_bytes: 8 << 30, ..state(0) };
        let mut c = call("a", 0);
        c.cpus = 1.5;
        c.memory_bytes = 2 << 30;
        let a = s.bid(&c, 0).unwrap();
        assert!((a.load - 1.5 / 4.0).abs() < 1e-9, "{}", a.load);
        // Held by a running attempt now; a second bid sees only what is left.
        let r = s.release("a").unwrap();
        s.running.push(("j/1".into(), r.hold));
        c.auction = "b".into();
        let b = s.bid(&c, 0).unwrap();
        assert!((b.load - 3.0 / 4.0).abs() < 1e-9, "{}", b.load);
        c.auction = "c".into();
        let e = s.bid(&c, 0).unwrap_err();
        assert_eq!(e.to_string(), "1.00 of 4 CPUs free, job needs 1.5");
        // Ten tenths fit one CPU.
        let mut tenth = call("t", 0);
        tenth.cpus = 0.1;
        s.reservations.clear();
        s.running.push(("j/2".into(), Hold { cpus: 1.5, ..Hold::default() }));
        for i in 0..10 {
            tenth.auction = format!("t{i}");
            assert!(s.bid(&tenth, 0).is_ok(), "tenth {i}");
        }
        tenth.auction = "t10".into();
        assert!(matches!(s.bid(&tenth, 0), Err(Decline::NotEnoughFreeCpus { .. })));
        // Memory is accounted the same way.
        let mut s = LocalState { cpus: 4.0, memory_bytes: 8 << 30, ..state(0) };
        let mut m = call("m", 0);
        m.cpus = 0.0;
        m.memory_bytes = 6 << 30;
        s.bid(&m, 0).unwrap();
        m.auction = "n".into();
        assert!(
            matches!(s.bid(&m, 0), Err(Decline::NotEnoughFreeMemory { free, .. }) if free == 2 << 30)
        );
        // A runner-up's award without its reservation takes only what is free.
        let e = s.take_for_award("gone", &Hold { memory_bytes: 3 << 30, ..Hold::default() }, 1);
        assert!(matches!(e, Err(GpuTaken::NoRoom(_))), "{e:?}");
        // A node whose size is unknown does not account.
        let mut u = state(0);
        assert_eq!(u.bid(&m, 0).map(|o| o.load), Ok(0.0));
    }
}
