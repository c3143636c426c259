//! Pure liveness logic: connected -> suspect -> lost, plus left (graceful).
//!
//! No I/O and no clock of its own: callers pass `now`, so tests drive it with a virtual
//! clock. The `Fleet` actor calls [`next_state`] on every tick and [`on_heard`] whenever a
//! frame arrives from the agent's current session.

use std::time::{Duration, Instant};

pub use fleetmesh_api::fleet::AgentState;

/// Liveness thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessConfig {
    pub suspect_after: Duration,
    pub lost_after: Duration,
    /// How often the Fleet re-evaluates liveness.
    pub tick: Duration,
}

impl Default for LivenessConfig {
    /// Agents beat every 500 ms. Suspect after 2 missed beats; lost after 4. With a 100 ms
    /// tick a node that dies is marked lost at most ~2.1 s after its last frame. That
    /// leaves ~0.9 s of the 3 s failover promise for re-auctioning and starting the job
    /// elsewhere, while one or two late beats never flap a healthy node.
    fn default() -> Self {
        Self {
            suspect_after: Duration::from_millis(1200),
            lost_after: Duration::from_millis(2000),
            tick: Duration::from_millis(100),
        }
    }
}

/// State after evaluating silence since `last_heard`.
pub fn next_state(
    current: AgentState,
    last_heard: Instant,
    now: Instant,
    cfg: &LivenessConfig,
) -> AgentState {
    match current {
        AgentState::Lost | AgentState::Left | AgentState::Revoked => current,
        AgentState::Connected | AgentState::Suspect => {
            let silent = now.saturating_duration_since(last_heard);
            if silent >= cfg.lost_after {
                AgentState::Lost
            } else if silent >= cfg.suspect_after {
                AgentState::Suspect
            } else {
                // Time alone never promotes: only a frame (`on_heard`) heals a suspect.
                current
            }
        }
    }
}

/// State after hearing a frame from the agent's current session.
pub fn on_heard(current: AgentState) -> AgentState {
    match current {
        // A frame from the live session proves the agent is up.
        AgentState::Connected | AgentState::Suspect | AgentState::Lost => AgentState::Connected,
        // A left agent only comes back through a new session (register); a revoked one
        // never does.
        AgentState::Left => AgentState::Left,
        AgentState::Revoked => AgentState::Revoked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_walks_connected_to_suspect_to_lost() {
        let cfg = LivenessConfig::default();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut s = AgentState::Connected;
        s = next_state(s, t0, at(1000), &cfg);
        assert_eq!(s, AgentState::Connected);
        s = next_state(s, t0, at(1200), &cfg);
        assert_eq!(s, AgentState::Suspect);
        s = next_state(s, t0, at(1999), &cfg);
        assert_eq!(s, AgentState::Suspect);
        s = next_state(s, t0, at(2000), &cfg);
        assert_eq!(s, AgentState::Lost);
        // Lost stays lost without a frame, however much time passes.
        assert_eq!(next_state(s, at(10_000), at(10_001), &cfg), AgentState::Lost);
    }

    #[test]
    fn frames_heal_suspect_but_not_left() {
        assert_eq!(on_heard(AgentState::Suspect), AgentState::Connected);
        assert_eq!(on_heard(AgentState::Lost), AgentState::Connected);
        assert_eq!(on_heard(AgentState::Left), AgentState::Left);
        let cfg = LivenessConfig::default();
        let t0 = Instant::now();
        assert_eq!(
            next_state(AgentState::Left, t0, t0 + Duration::from_secs(60), &cfg),
            AgentState::Left
        );
    }

    #[test]
    fn time_alone_never_promotes_a_suspect() {
        // After a coordinator restart agents are restored as suspect with a fresh clock.
        let cfg = LivenessConfig::default();
        let t0 = Instant::now();
        assert_eq!(next_state(AgentState::Suspect, t0, t0, &cfg), AgentState::Suspect);
        assert_eq!(
            next_state(AgentState::Suspect, t0, t0 + Duration::from_millis(100), &cfg),
            AgentState::Suspect
        );
        assert_eq!(
            next_state(AgentState::Suspect, t0, t0 + cfg.lost_after, &cfg),
            AgentState::Lost
        );
    }

    #[test]
    fn worst_case_detection_is_within_three_seconds() {
        let cfg = LivenessConfig::default();
        // Last frame just before death, tick phase worst case.
        assert!(cfg.lost_after + cfg.tick < Duration::from_secs(3));
    }
}
