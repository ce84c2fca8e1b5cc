//! The one path that acts on a session. Every cancel and terminate that session_kill sends, from
//! `kill_sessions`, `drain_database` (sessions and logins still starting up) and the worker, goes
//! through `Acting::signal`: it leaves the reason for the session's client, sends the signal,
//! logs one line, turns a failure into an outcome and queues the audit entry. `Acting::finish`
//! then settles that entry with the final outcome, or records what was decided without a signal
//! (a dry run, a skip), and counts it. The log line, the client's detail, the audit row and the
//! counters therefore say the same thing whichever path acted.

use crate::audit::{self, Act};
use crate::counters::Source;
use crate::policy::{escape, Outcome, Protection, Session};
use crate::signal::{self, Signal, SignalError};
use pgrx::prelude::*;

/// What was done to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Action {
    #[default]
    None,
    Cancel,
    Terminate,
    /// Cancelled, then terminated when it did not go.
    CancelThenTerminate,
}

impl Action {
    pub fn label(self) -> &'static str {
        match self {
            Action::None => "none",
            Action::Cancel => "cancel",
            Action::Terminate => "terminate",
            Action::CancelThenTerminate => "cancel, terminate",
        }
    }

    pub fn cancelled(self) -> bool {
        matches!(self, Action::Cancel | Action::CancelThenTerminate)
    }

    pub fn terminated(self) -> bool {
        matches!(self, Action::Terminate | Action::CancelThenTerminate)
    }

    /// What was done once `signal` was sent too.
    fn and(self, signal: Signal) -> Action {
        match (self, signal) {
            (Action::None, Signal::Cancel) => Action::Cancel,
            (Action::None | Action::Terminate, Signal::Terminate) => Action::Terminate,
            (Action::Cancel | Action::CancelThenTerminate, Signal::Terminate) => Action::CancelThenTerminate,
            (done, Signal::Cancel) => done,
        }
    }
}

fn signal_name(signal: Signal) -> &'static str {
    match signal {
        Signal::Cancel => "cancel",
        Signal::Terminate => "terminate",
    }
}

/// The session acted on, with what the log and the audit show besides the session's own facts.
pub struct Subject<'a> {
    pub session: &'a Session,
    pub database: Option<&'a str>,
    pub query: Option<&'a str>,
}

/// Who acts, and why.
pub struct Acting<'a> {
    pub source: Source,
    /// What the counters group by: the worker's rule, the functions' mode.
    pub counted_as: &'a str,
    /// The worker's rule (`rule 3`, `session_kill.idle_timeout`).
    pub rule: Option<&'a str>,
    /// The caller's reason, or the worker's explanation: for the log line and the audit row.
    pub reason: Option<&'a str>,
    /// What the session's client is told, after `session_kill: `, in its message's DETAIL.
    pub told: &'a str,
}

/// What was done to one session so far, and its audit entry once a signal went out.
#[derive(Default)]
pub struct Progress {
    pub action: Action,
    pending: Option<audit::Pending>,
}

impl Acting<'_> {
    /// Sends `signal` to the subject, telling its client why, logs it, and queues its audit
    /// entry (once per session) as signalled, so that it is on record whatever happens to the
    /// caller next. When nothing could be sent, the outcome that says why.
    pub fn signal(&self, subject: &Subject, signal: Signal, progress: &mut Progress) -> Result<(), Outcome> {
        let s = subject.session;
        match signal::send_telling(s.pid, s.backend_start, signal, self.told) {
            Ok(()) => {
                progress.action = progress.action.and(signal);
                // Queued before the LOG line: ending an elog checks for interrupts, and a caller
                // cancelled or terminated there must leave the signal it sent on record.
                if progress.pending.is_none() {
                    let act = self.act(subject, progress.action, "signalled");
                    progress.pending = Some(audit::record_signal(&act));
                }
                log!(
                    "session_kill: sent {} to {}{}",
                    signal_name(signal),
                    s.describe(subject.database),
                    self.because()
                );
                Ok(())
            }
            Err(SignalError::Gone) => Err(Outcome::AlreadyGone),
            Err(SignalError::PermissionDenied) => Err(Outcome::Protected(Protection::PermissionDenied)),
            Err(SignalError::Os(errno)) => {
                warning!(
                    "session_kill: could not send {} to {}: errno {errno}",
                    signal_name(signal),
                    s.describe(subject.database)
                );
                Err(Outcome::SignalFailed)
            }
        }
    }

    /// In dry run: logs the signal that would be sent.
    pub fn would_signal(&self, subject: &Subject, signal: Signal) {
        log!(
            "session_kill: dry run, would send {} to {}{}",
            signal_name(signal),
            subject.session.describe(subject.database),
            self.because()
        );
    }

    /// The final word on one session: settles the audit entry of the signals sent, or records
    /// what was decided without one (a dry run, a skip, a failure); either way it is counted.
    pub fn finish(&self, subject: &Subject, progress: &Progress, outcome: Outcome) {
        let outcome = outcome.to_string();
        match &progress.pending {
            Some(pending) => pending.settle(progress.action.label(), &outcome),
            None => audit::record(&self.act(subject, progress.action, &outcome), false),
        }
    }

    fn because(&self) -> String {
        self.reason.map(|r| format!(": {}", escape(r))).unwrap_or_default()
    }

    fn act<'a>(&'a self, subject: &'a Subject, action: Action, outcome: &'a str) -> Act<'a> {
        Act {
            source: self.source,
            counted_as: self.counted_as,
            rule: self.rule,
            reason: self.reason,
            pid: subject.session.pid,
            session: Some(subject.session),
            database: subject.database,
            query: subject.query,
            action: action.label(),
            outcome,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_add_up_to_what_the_report_shows() {
        assert_eq!(Action::None.and(Signal::Cancel), Action::Cancel);
        assert_eq!(Action::Cancel.and(Signal::Terminate), Action::CancelThenTerminate);
        assert_eq!(Action::None.and(Signal::Terminate), Action::Terminate);
        assert_eq!(Action::CancelThenTerminate.label(), "cancel, terminate");
        assert!(Action::CancelThenTerminate.cancelled() && Action::CancelThenTerminate.terminated());
        assert!(!Action::Terminate.cancelled() && !Action::Cancel.terminated());
    }
}
