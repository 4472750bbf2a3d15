//! The rollout engine's decisions: where each rollout route stands, and what one tick of
//! time and measurements does to it.
//!
//! ```text
//!            canary healthy                 hold over + min_requests      last step done
//! Pending ─────────────────► Progressing ─────────────────────────► (next step) ──────► Complete
//!    │ progress_deadline        │  ▲ pause / resume
//!    │                          ▼  │
//!    │                        Paused          analysis fails, canary unhealthy
//!    └──────────────────────────┴─────────────────────────────────────────────────────► RolledBack
//! ```
//!
//! Everything here is plain data and arithmetic, so the tests drive it with made-up
//! measurements. The control path owns each route's [`Progress`], feeds it [`Observed`]
//! figures every tick, and carries out what comes back: the split, events, persistence.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Analysis, BasisPoints, Config, RolloutSpec, Strategy, ALL};
use crate::stats::Summary;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// The canary is not healthy yet: it gets no traffic.
    Pending,
    Progressing,
    /// The step timer is frozen; analysis and automatic rollback stay on.
    Paused,
    /// The canary serves 100 %: it is the stable side now.
    Complete,
    RolledBack,
}

/// Where one rollout stands. Persisted in the state file, so a restart resumes at the same
/// step with the hold's remaining time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    /// The canary's name, version and servers: a new identity is a new rollout.
    pub identity: String,
    pub phase: Phase,
    pub step: usize,
    /// Time spent at the current step (not counting pauses).
    pub held_ms: u64,
    /// Time spent `Pending`.
    #[serde(default)]
    pub pending_ms: u64,
    /// How long the canary has had no server in rotation, while it should have traffic.
    #[serde(default)]
    pub unhealthy_ms: u64,
    /// Why it was rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The hold is over but the window has too few requests to judge the step.
    #[serde(skip)]
    pub waiting_for_traffic: bool,
    /// An automatic rollback that is due but held, and why.
    #[serde(skip)]
    pub rollback_held: Option<String>,
}

/// What the engine sees of a rollout's two sides at a tick.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observed {
    pub canary: Summary,
    pub stable: Summary,
    pub canary_in_rotation: bool,
    pub stable_in_rotation: bool,
}

/// What a tick or a command changed, for the control path to carry out and record.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Pending → Progressing: the canary passed its health checks.
    Started,
    Advanced {
        from: usize,
        to: usize,
    },
    Completed,
    RolledBack {
        reason: String,
    },
    /// An automatic rollback is due, but the stable side has no server in rotation.
    RollbackHeld {
        reason: String,
    },
    /// The hold of the current step ended without enough requests to judge it.
    WaitingForTraffic,
    /// By hand: `pause` and `resume`.
    Paused,
    Resumed,
}

/// The identity of a route's rollout in `config`: the canary backend's name, version and
/// servers.
pub fn identity(config: &Config, spec: &RolloutSpec) -> String {
    let Some(canary) = config.backend(&spec.canary) else { return spec.canary.clone() };
    let mut servers: Vec<String> = canary.servers.iter().map(ToString::to_string).collect();
    servers.sort();
    format!("{} {} [{}]", canary.name, canary.version.as_deref().unwrap_or("-"), servers.join(" "))
}

/// How long a step is held before it may advance. Blue-green has one step, held for
/// `cleanup` (the old side stays ready meanwhile); a step with no hold advances as soon as
/// the window has enough requests.
pub fn hold(spec: &RolloutSpec, step: usize) -> Duration {
    match spec.strategy {
        Strategy::BlueGreen => spec.cleanup,
        Strategy::Canary => spec.steps.get(step).and_then(|s| s.hold).unwrap_or(Duration::ZERO),
    }
}

impl Progress {
    pub fn new(identity: String) -> Progress {
        Progress {
            identity,
            phase: Phase::Pending,
            step: 0,
            held_ms: 0,
            pending_ms: 0,
            unhealthy_ms: 0,
            reason: None,
            waiting_for_traffic: false,
            rollback_held: None,
        }
    }

    /// Keeps a reload of the steps from raising the canary's share by itself. A step past
    /// the end of a shortened list would read as 100 %, and an edited list can put a
    /// higher weight at the current step; either way the rollout goes on from the highest
    /// step whose weight is not above `weight`, the canary's share before, or from the
    /// first step when that is not known (a restart). The hold starts again. True if the
    /// step moved.
    pub fn fit_steps(&mut self, spec: &RolloutSpec, weight: Option<BasisPoints>) -> bool {
        let running = matches!(self.phase, Phase::Progressing | Phase::Paused);
        if !running || spec.strategy != Strategy::Canary {
            return false;
        }
        let raised = match spec.steps.get(self.step) {
            None => true,
            Some(step) => weight.is_some_and(|w| step.weight > w),
        };
        if !raised {
            return false;
        }
        let at_most = weight.unwrap_or(0);
        self.step = spec.steps.iter().rposition(|s| s.weight <= at_most).unwrap_or(0);
        self.held_ms = 0;
        true
    }

    /// The canary's share of the route now.
    pub fn canary_weight(&self, spec: &RolloutSpec) -> BasisPoints {
        match self.phase {
            Phase::Pending | Phase::RolledBack => 0,
            Phase::Progressing | Phase::Paused if spec.strategy == Strategy::BlueGreen => ALL,
            Phase::Progressing | Phase::Paused => spec.steps.get(self.step).map_or(ALL, |s| s.weight),
            Phase::Complete => ALL,
        }
    }

    /// The route's split: stable and canary, in basis points.
    pub fn split(&self, spec: &RolloutSpec) -> Vec<(String, BasisPoints)> {
        let canary = self.canary_weight(spec);
        [(spec.canary.clone(), canary), (spec.stable.clone(), ALL - canary)]
            .into_iter()
            .filter(|(_, w)| *w > 0)
            .collect()
    }

    /// Time left in the current step's hold.
    pub fn hold_left(&self, spec: &RolloutSpec) -> Duration {
        hold(spec, self.step).saturating_sub(Duration::from_millis(self.held_ms))
    }

    /// One tick: `elapsed` since the last, and the figures over the analysis window.
    pub fn tick(&mut self, spec: &RolloutSpec, elapsed: Duration, seen: &Observed) -> Option<Change> {
        let ms = elapsed.as_millis() as u64;
        match self.phase {
            Phase::Complete | Phase::RolledBack => None,
            Phase::Pending => {
                if seen.canary_in_rotation {
                    self.phase = Phase::Progressing;
                    self.step = 0;
                    self.held_ms = 0;
                    return Some(Change::Started);
                }
                self.pending_ms += ms;
                if self.pending_ms >= spec.progress_deadline.as_millis() as u64 {
                    // It has had no traffic: nothing to check on the stable side.
                    return Some(self.roll_back(format!(
                        "the canary did not pass its health checks within progress_deadline {}",
                        humantime::format_duration(spec.progress_deadline)
                    )));
                }
                None
            }
            Phase::Progressing | Phase::Paused => {
                self.unhealthy_ms = if seen.canary_in_rotation { 0 } else { self.unhealthy_ms + ms };
                let failing = if self.unhealthy_ms > spec.analysis.window.as_millis() as u64 {
                    Some(format!(
                        "the canary has had no server in rotation for longer than the analysis window ({})",
                        humantime::format_duration(spec.analysis.window)
                    ))
                } else {
                    verdict(&spec.analysis, seen)
                };
                if let Some(reason) = failing {
                    if !seen.stable_in_rotation {
                        let held = format!("rollback held: the stable side has no server in rotation ({reason})");
                        let first = self.rollback_held.as_deref() != Some(held.as_str());
                        self.rollback_held = Some(held.clone());
                        return first.then_some(Change::RollbackHeld { reason: held });
                    }
                    return Some(self.roll_back(reason));
                }
                self.rollback_held = None;
                if self.phase == Phase::Paused {
                    return None;
                }
                self.held_ms += ms;
                if self.held_ms < hold(spec, self.step).as_millis() as u64 {
                    return None;
                }
                if seen.canary.requests < spec.analysis.min_requests {
                    let first = !self.waiting_for_traffic;
                    self.waiting_for_traffic = true;
                    return first.then_some(Change::WaitingForTraffic);
                }
                Some(self.advance(spec))
            }
        }
    }

    /// The next step, or the end of the rollout after the last.
    fn advance(&mut self, spec: &RolloutSpec) -> Change {
        self.waiting_for_traffic = false;
        self.held_ms = 0;
        let steps = match spec.strategy {
            Strategy::BlueGreen => 1,
            Strategy::Canary => spec.steps.len(),
        };
        if self.step + 1 < steps {
            let from = self.step;
            self.step += 1;
            Change::Advanced { from, to: self.step }
        } else {
            self.phase = Phase::Complete;
            Change::Completed
        }
    }

    fn roll_back(&mut self, reason: String) -> Change {
        self.phase = Phase::RolledBack;
        self.reason = Some(reason.clone());
        self.waiting_for_traffic = false;
        self.rollback_held = None;
        Change::RolledBack { reason }
    }

    /// `ctl promote`: skips the current hold (and the wait for traffic); at the last step,
    /// finishes the rollout. A pending canary is not promoted: it is not healthy.
    pub fn promote(&mut self, spec: &RolloutSpec) -> Result<Change, String> {
        match self.phase {
            Phase::Progressing | Phase::Paused => Ok(self.advance(spec)),
            Phase::Pending => Err("the canary has not passed its health checks yet (Pending)".into()),
            Phase::Complete => Err("the rollout is already complete".into()),
            Phase::RolledBack => Err("the rollout was rolled back; `resume` retries it".into()),
        }
    }

    pub fn pause(&mut self) -> Result<(), String> {
        match self.phase {
            Phase::Progressing => {
                self.phase = Phase::Paused;
                Ok(())
            }
            Phase::Paused => Err("the rollout is already paused".into()),
            other => Err(format!("only a progressing rollout can be paused; it is {other:?}")),
        }
    }

    /// `ctl resume`: unfreezes a paused rollout, or retries a rolled-back one from the start.
    pub fn resume(&mut self) -> Result<(), String> {
        match self.phase {
            Phase::Paused => {
                self.phase = Phase::Progressing;
                Ok(())
            }
            Phase::RolledBack => {
                *self = Progress::new(std::mem::take(&mut self.identity));
                Ok(())
            }
            other => Err(format!("only a paused or rolled-back rollout can be resumed; it is {other:?}")),
        }
    }

    /// `ctl rollback`: by hand, always acts.
    pub fn rollback(&mut self, reason: String) -> Change {
        self.roll_back(reason)
    }

    /// Status text for people: the phase, and why it is not moving when it is not.
    pub fn describe(&self) -> String {
        match (&self.rollback_held, self.waiting_for_traffic) {
            (Some(held), _) => format!("{:?}: {held}", self.phase),
            (None, true) => format!("{:?}: waiting for traffic", self.phase),
            _ => format!("{:?}", self.phase),
        }
    }
}

/// Why the canary fails its analysis, if it does: only once it has `min_requests`.
pub fn verdict(analysis: &Analysis, seen: &Observed) -> Option<String> {
    let (canary, stable) = (&seen.canary, &seen.stable);
    if canary.requests < analysis.min_requests || canary.requests == 0 {
        return None;
    }
    let pct = |bps: BasisPoints| f64::from(bps) / 100.0;
    if let Some(max) = analysis.max_error_rate {
        if canary.error_rate() > pct(max) {
            return Some(format!("error rate {:.2} % is over max_error_rate {} %", canary.error_rate(), pct(max)));
        }
    }
    if let (Some(max), Some(p99)) = (analysis.max_p99, canary.p99) {
        if p99 > max {
            return Some(format!("p99 {p99:?} is over max_p99 {max:?}"));
        }
    }
    if stable.requests > 0 {
        if let Some(over) = analysis.max_error_rate_over_stable {
            if canary.error_rate() - stable.error_rate() > pct(over) {
                return Some(format!(
                    "error rate {:.2} % is more than max_error_rate_over_stable {} % over the stable side's {:.2} %",
                    canary.error_rate(),
                    pct(over),
                    stable.error_rate()
                ));
            }
        }
        if let (Some(over), Some(p99), Some(stable_p99)) = (analysis.max_p99_over_stable, canary.p99, stable.p99) {
            if p99.saturating_sub(stable_p99) > over {
                return Some(format!(
                    "p99 {p99:?} is more than max_p99_over_stable {over:?} over the stable side's {stable_p99:?}"
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Step;

    fn spec(strategy: Strategy) -> RolloutSpec {
        RolloutSpec {
            strategy,
            stable: "blue".into(),
            canary: "green".into(),
            steps: vec![
                Step { weight: 1000, hold: Some(Duration::from_secs(2)) },
                Step { weight: 5000, hold: Some(Duration::from_secs(2)) },
                Step { weight: ALL, hold: None },
            ],
            analysis: Analysis {
                window: Duration::from_secs(5),
                min_requests: 10,
                max_error_rate: Some(100),
                max_p99: Some(Duration::from_millis(100)),
                max_error_rate_over_stable: None,
                max_p99_over_stable: None,
            },
            cleanup: Duration::from_secs(3),
            progress_deadline: Duration::from_secs(4),
        }
    }

    fn figures(requests: u64, failures: u64, p99_ms: u64) -> Summary {
        Summary {
            requests,
            failures,
            span: Duration::from_secs(5),
            p50: Some(Duration::from_millis(p99_ms / 2)),
            p99: Some(Duration::from_millis(p99_ms)),
        }
    }

    fn healthy(requests: u64) -> Observed {
        Observed {
            canary: figures(requests, 0, 20),
            stable: figures(requests, 0, 20),
            canary_in_rotation: true,
            stable_in_rotation: true,
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_step_list_cut_below_the_step_never_raises_the_canary() {
        let mut cut = spec(Strategy::Canary);
        cut.steps = vec![Step { weight: 1000, hold: Some(SECOND) }, Step { weight: ALL, hold: None }];
        let at = |step, phase| Progress { step, phase, held_ms: 700, ..Progress::new("green".into()) };

        // At 50 % on step 3 of 4, cut to [10 %, 100 %]: back to 10 %, not on to 100 %.
        let mut p = at(2, Phase::Progressing);
        assert_eq!(p.canary_weight(&cut), ALL, "unfitted, the missing step reads as 100 %");
        assert!(p.fit_steps(&cut, Some(5000)));
        assert_eq!((p.step, p.held_ms, p.canary_weight(&cut)), (0, 0, 1000));
        // A restart, where the weight before is not known: the first step.
        let mut p = at(5, Phase::Paused);
        assert!(p.fit_steps(&cut, None));
        assert_eq!(p.step, 0);
        // Cut to [10 %, 100 %] from step 2 of 4 (20 %): the last step is in the list but
        // would raise the canary to 100 %.
        let mut p = at(1, Phase::Progressing);
        assert!(p.fit_steps(&cut, Some(2000)));
        assert_eq!(p.canary_weight(&cut), 1000);
        // A step still in the list at the same weight, or a rollout not under way, is
        // left alone.
        for mut p in
            [at(1, Phase::Progressing), at(3, Phase::Complete), at(3, Phase::RolledBack), at(3, Phase::Pending)]
        {
            let before = (p.step, p.held_ms);
            assert!(!p.fit_steps(&cut, Some(ALL)));
            assert_eq!((p.step, p.held_ms), before);
        }
    }

    #[test]
    fn a_healthy_canary_walks_every_step_to_complete() {
        let spec = spec(Strategy::Canary);
        let mut p = Progress::new("green".into());
        let pending = Observed { canary_in_rotation: false, ..healthy(0) };
        assert_eq!(p.tick(&spec, SECOND, &pending), None);
        assert_eq!(p.canary_weight(&spec), 0, "no traffic while pending");
        assert_eq!(p.tick(&spec, SECOND, &healthy(0)), Some(Change::Started));
        assert_eq!(p.canary_weight(&spec), 1000);
        assert_eq!(p.tick(&spec, SECOND, &healthy(50)), None);
        assert_eq!(p.hold_left(&spec), SECOND);
        assert_eq!(p.tick(&spec, SECOND, &healthy(50)), Some(Change::Advanced { from: 0, to: 1 }));
        assert_eq!(p.split(&spec), vec![("green".into(), 5000), ("blue".into(), 5000)]);
        p.tick(&spec, SECOND, &healthy(50));
        assert_eq!(p.tick(&spec, SECOND, &healthy(50)), Some(Change::Advanced { from: 1, to: 2 }));
        assert_eq!(p.tick(&spec, SECOND, &healthy(50)), Some(Change::Completed));
        assert_eq!(p.split(&spec), vec![("green".into(), ALL)]);
        assert_eq!(p.tick(&spec, SECOND, &healthy(50)), None, "complete is final");
    }

    #[test]
    fn errors_or_latency_over_the_limits_roll_back_once_there_is_evidence() {
        let spec = spec(Strategy::Canary);
        for (canary, rolls_back) in [
            (figures(9, 5, 20), false),   // under min_requests: no judgement
            (figures(100, 1, 20), false), // 1 % is not over 1 %
            (figures(100, 20, 20), true),
            (figures(100, 0, 400), true),
        ] {
            let mut p = Progress::new("green".into());
            p.tick(&spec, SECOND, &healthy(0));
            let seen = Observed { canary, ..healthy(100) };
            let change = p.tick(&spec, SECOND, &seen);
            assert_eq!(matches!(change, Some(Change::RolledBack { .. })), rolls_back, "{canary:?}: {change:?}");
            if rolls_back {
                assert_eq!(p.split(&spec), vec![("blue".into(), ALL)]);
            }
        }
    }

    #[test]
    fn relative_limits_compare_with_the_stable_side() {
        let mut spec = spec(Strategy::Canary);
        spec.analysis.max_error_rate = None;
        spec.analysis.max_p99 = None;
        spec.analysis.max_p99_over_stable = Some(Duration::from_millis(50));
        let seen = |canary_p99, stable_p99| Observed {
            canary: figures(100, 0, canary_p99),
            stable: figures(100, 0, stable_p99),
            canary_in_rotation: true,
            stable_in_rotation: true,
        };
        assert_eq!(verdict(&spec.analysis, &seen(300, 280)), None);
        assert!(verdict(&spec.analysis, &seen(300, 200)).is_some_and(|r| r.contains("max_p99_over_stable")));
    }

    #[test]
    fn a_step_waits_for_traffic_and_promote_skips_the_wait() {
        let spec = spec(Strategy::Canary);
        let mut p = Progress::new("green".into());
        p.tick(&spec, SECOND, &healthy(0));
        for _ in 0..2 {
            p.tick(&spec, SECOND, &healthy(3));
        }
        assert_eq!(p.step, 0, "too few requests: no advance");
        assert!(p.waiting_for_traffic);
        assert_eq!(p.describe(), "Progressing: waiting for traffic");
        assert_eq!(p.tick(&spec, SECOND, &healthy(3)), None, "said once");
        assert_eq!(p.promote(&spec), Ok(Change::Advanced { from: 0, to: 1 }));
        assert!(!p.waiting_for_traffic);
    }

    #[test]
    fn pause_freezes_the_hold_but_not_the_analysis() {
        let spec = spec(Strategy::Canary);
        let mut p = Progress::new("green".into());
        p.tick(&spec, SECOND, &healthy(0));
        p.pause().expect("pausable");
        for _ in 0..5 {
            assert_eq!(p.tick(&spec, SECOND, &healthy(50)), None);
        }
        assert_eq!((p.step, p.held_ms), (0, 0));
        let failing = Observed { canary: figures(100, 50, 20), ..healthy(100) };
        assert!(matches!(p.tick(&spec, SECOND, &failing), Some(Change::RolledBack { .. })));
        assert!(p.pause().is_err());
        p.resume().expect("a rolled-back rollout can be retried");
        assert_eq!((p.phase, p.step), (Phase::Pending, 0));
    }

    #[test]
    fn a_canary_pending_past_its_deadline_is_rolled_back() {
        let spec = spec(Strategy::Canary);
        let mut p = Progress::new("green".into());
        let pending = Observed { canary_in_rotation: false, ..healthy(0) };
        for _ in 0..3 {
            assert_eq!(p.tick(&spec, SECOND, &pending), None);
        }
        let change = p.tick(&spec, SECOND, &pending);
        assert!(matches!(&change, Some(Change::RolledBack { reason }) if reason.contains("progress_deadline")));
    }

    #[test]
    fn no_rollback_onto_a_stable_side_with_no_server() {
        let spec = spec(Strategy::Canary);
        let mut p = Progress::new("green".into());
        p.tick(&spec, SECOND, &healthy(0));
        let failing = Observed { canary: figures(100, 50, 20), stable_in_rotation: false, ..healthy(100) };
        assert!(matches!(p.tick(&spec, SECOND, &failing), Some(Change::RollbackHeld { .. })));
        assert_eq!(p.tick(&spec, SECOND, &failing), None, "the hold is reported once");
        assert_eq!(p.canary_weight(&spec), 1000, "the canary keeps its weight");
        assert!(p.describe().contains("rollback held"));
        let stable_back = Observed { stable_in_rotation: true, ..failing };
        assert!(matches!(p.tick(&spec, SECOND, &stable_back), Some(Change::RolledBack { .. })));
    }

    #[test]
    fn a_canary_with_no_server_for_a_window_is_rolled_back() {
        let spec = spec(Strategy::Canary);
        let mut p = Progress::new("green".into());
        p.tick(&spec, SECOND, &healthy(0));
        let down = Observed { canary_in_rotation: false, ..healthy(0) };
        for _ in 0..5 {
            assert!(!matches!(p.tick(&spec, SECOND, &down), Some(Change::RolledBack { .. })), "not before a window");
        }
        assert!(matches!(p.tick(&spec, SECOND, &down), Some(Change::RolledBack { .. })));
    }

    #[test]
    fn blue_green_switches_whole_and_holds_for_cleanup() {
        let spec = spec(Strategy::BlueGreen);
        let mut p = Progress::new("green".into());
        assert_eq!(p.tick(&spec, SECOND, &healthy(0)), Some(Change::Started));
        assert_eq!(p.split(&spec), vec![("green".into(), ALL)], "one switch to 100 %");
        assert_eq!(p.hold_left(&spec), Duration::from_secs(3), "cleanup");
        p.tick(&spec, SECOND, &healthy(50));
        let failing = Observed { canary: figures(100, 50, 20), ..healthy(0) };
        assert!(matches!(p.tick(&spec, SECOND, &failing), Some(Change::RolledBack { .. })), "analysis runs in cleanup");

        let mut p = Progress::new("green".into());
        p.tick(&spec, SECOND, &healthy(0));
        for _ in 0..2 {
            assert_eq!(p.tick(&spec, SECOND, &healthy(50)), None);
        }
        assert_eq!(p.tick(&spec, SECOND, &healthy(50)), Some(Change::Completed));
    }

    #[test]
    fn progress_survives_a_round_trip_through_the_state_file() {
        let spec = spec(Strategy::Canary);
        let mut p = Progress::new("green v2 [127.0.0.1:9101]".into());
        p.tick(&spec, SECOND, &healthy(0));
        p.tick(&spec, Duration::from_millis(1500), &healthy(50));
        let text = serde_json::to_string(&p).expect("json");
        let back: Progress = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, p);
        assert_eq!(back.hold_left(&spec), Duration::from_millis(500));
    }
}
