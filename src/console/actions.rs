//! What the console's buttons do: replay a spooled record now, move it to dead, purge it, and
//! reset a route's learned limit. Each is logged by the caller with who did it.
//!
//! Replay goes through the same functions as the redelivery task ([`deliver::attempt`], then
//! [`deliver::settle`]), so a record replayed from the console is trimmed, keyed and settled
//! exactly as a scheduled redelivery would be.

use std::time::SystemTime;

use bytes::Bytes;

use crate::deliver::{self, Settled};
use crate::incident::Bracket;
use crate::judge::Verdict;
use crate::proxy::{Proxy, Shared};
use crate::spool::{Claim, RecordId, SpoolError, State};

/// A button on a spooled record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolAction {
    /// Deliver it now, whatever its next attempt time (a dead record is revived first).
    Replay,
    /// Give up on it: move it to `dead/`.
    Dead,
    /// Delete it.
    Purge,
}

impl SpoolAction {
    /// The action's name in paths and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SpoolAction::Replay => "replay",
            SpoolAction::Dead => "dead",
            SpoolAction::Purge => "purge",
        }
    }

    /// The action named `name` in a path.
    pub fn parse(name: &str) -> Option<SpoolAction> {
        [SpoolAction::Replay, SpoolAction::Dead, SpoolAction::Purge]
            .into_iter()
            .find(|a| a.as_str() == name)
    }
}

/// Why an action did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// No route spools.
    #[error("no route spools: there is nothing to act on")]
    NoSpool,
    /// The record is not in the spool (delivered, purged, or never there).
    #[error("no spool record {0} (delivered or purged meanwhile?)")]
    NotFound(RecordId),
    /// The record is not in a state the action applies to, or is held by an attempt.
    #[error("{0}")]
    Conflict(String),
    /// The spool failed.
    #[error("spool error: {0}")]
    Spool(#[from] SpoolError),
}

/// Runs `action` on record `id`; returns what happened, in a sentence. `who` goes into the
/// record's `last_error` when it is moved to dead.
pub async fn spool_action(
    proxy: &Proxy,
    action: SpoolAction,
    id: &RecordId,
    who: &str,
) -> Result<String, ActionError> {
    let state = proxy.shared().spool.clone().ok_or(ActionError::NoSpool)?;
    let spool = state.spool.clone();
    let owned_id = id.clone();
    let who = who.to_string();
    let blocking = tokio::task::spawn_blocking(move || -> Result<_, ActionError> {
        let id = owned_id;
        let entry = spool
            .find(&id)?
            .ok_or_else(|| ActionError::NotFound(id.clone()))?;
        if entry.claimed {
            return Err(ActionError::Conflict(
                "a redelivery attempt holds this record right now: try again in a moment".into(),
            ));
        }
        match (action, entry.state) {
            (_, State::Archive) => Err(ActionError::Conflict(
                "archived originals are kept for reference, not delivered: use payload-guard replay"
                    .into(),
            )),
            (SpoolAction::Purge, state) => {
                if spool.remove(state, &id)? {
                    Ok(Step::Done(format!("purged {state} record {id}")))
                } else {
                    Err(ActionError::NotFound(id))
                }
            }
            (SpoolAction::Dead, State::Dead) => {
                Err(ActionError::Conflict(format!("record {id} is already dead")))
            }
            (SpoolAction::Dead, _) => {
                let claim = claim(&spool, &id)?;
                claim.bury(None, "", &format!("moved to dead from the console by {who}"))?;
                Ok(Step::Done(format!("moved record {id} to dead")))
            }
            (SpoolAction::Replay, state) => {
                if state == State::Dead && !spool.revive(&id)? {
                    return Err(ActionError::NotFound(id));
                }
                let mut claim = claim(&spool, &id)?;
                let body = claim.body()?;
                Ok(Step::Deliver(Box::new(claim), body))
            }
        }
    })
    .await
    .map_err(|e| ActionError::Conflict(format!("the action failed: {e}")))??;
    let (claim, body) = match blocking {
        Step::Done(message) => return Ok(message),
        Step::Deliver(claim, body) => (*claim, body),
    };
    let meta = claim.meta().clone();
    let runtime = proxy.current();
    let result = deliver::attempt(
        &runtime,
        proxy.shared().services(),
        &meta,
        Bytes::from(body),
        None,
    )
    .await;
    let now = SystemTime::now();
    let seed = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(meta.attempts);
    let settled = deliver::settle(claim, &result, &state, now, seed).await;
    Ok(match (&result.verdict, settled) {
        (Verdict::Delivered, _) => format!(
            "replayed record {id}: delivered (the receiver answered {})",
            result.status.unwrap_or(200)
        ),
        (_, Settled::Buried) => format!(
            "replayed record {id}: the receiver refused it{}; moved to dead",
            result
                .status
                .map(|s| format!(" with {s}"))
                .unwrap_or_default()
        ),
        (Verdict::Retryable(why), _) => {
            format!("replayed record {id}: not delivered ({why}); it waits for its next attempt")
        }
        (_, _) => format!(
            "replayed record {id}: not delivered ({}); it waits for its next attempt",
            result.verdict.as_str()
        ),
    })
}

/// What the blocking part of an action leaves to do.
enum Step {
    Done(String),
    Deliver(Box<Claim>, Vec<u8>),
}

fn claim(spool: &crate::spool::Spool, id: &RecordId) -> Result<Claim, ActionError> {
    spool.claim(id)?.ok_or_else(|| {
        ActionError::Conflict(format!(
            "record {id} was taken by a redelivery attempt meanwhile: look again in a moment"
        ))
    })
}

// The three functions below are the console's only view of learned limits (the state kept
// by [`crate::state::LearnedLimits`]).

/// What is known about `route`'s receiver (empty when nothing): the bracket in wire bytes, or
/// in decoded bytes when only compressed payloads were refused.
pub fn learned_bracket(shared: &Shared, route: &str) -> Bracket {
    shared
        .learned
        .route(route)
        .map_or_else(Bracket::default, |l| {
            if l.wire.is_empty() { l.decoded } else { l.wire }
        })
}

/// Every route's learned bracket, by name (routes with nothing learned are left out).
pub fn learned_brackets(shared: &Shared) -> Vec<(String, Bracket)> {
    shared
        .learned
        .snapshot()
        .into_iter()
        .map(|(name, _)| {
            let bracket = learned_bracket(shared, &name);
            (name, bracket)
        })
        .filter(|(_, bracket)| !bracket.is_empty())
        .collect()
}

/// Forgets what was learned about `route`'s receiver (in memory and in the state file);
/// returns the bracket it had. The configured `upstream_limit` applies again until the
/// receiver refuses another payload.
pub fn reset_learned(shared: &Shared, route: &str) -> Bracket {
    let before = learned_bracket(shared, route);
    shared.learned.reset(route);
    before
}
