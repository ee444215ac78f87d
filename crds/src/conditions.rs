//! Condition types and the one rule every writer follows when it sets a condition.
//!
//! `Ready`, `Reconciling` and `Stalled` follow kstatus (`Reconciling` and `Stalled` are what
//! kstatus reads; `Ready` is for people and for the health checks in `gitops/`, which Argo CD
//! needs and Flux uses to wait for `Ready`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// kstatus: the object is fully reconciled and working.
pub const READY: &str = "Ready";
/// kstatus: work is under way (abnormal-true).
pub const RECONCILING: &str = "Reconciling";
/// kstatus: progress is blocked until the user changes something (abnormal-true).
pub const STALLED: &str = "Stalled";
/// Every selected node enforces the pin.
pub const ENFORCED: &str = "Enforced";
/// Packets for the peer came from outside its pin.
pub const SOURCE_VIOLATION: &str = "SourceViolation";

/// Sets `new` in `conditions`, replacing the condition of the same type. The transition time
/// only moves when the status changes, as `meta.SetStatusCondition` does in Go, so repeated
/// reconciles with the same outcome write identical objects. Returns whether anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            let transition_time = if existing.status == new.status {
                existing.last_transition_time.clone()
            } else {
                new.last_transition_time.clone()
            };
            let updated = Condition {
                last_transition_time: transition_time,
                ..new
            };
            if *existing == updated {
                false
            } else {
                *existing = updated;
                true
            }
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// The API server refuses a condition message longer than this (bytes).
pub const MAX_MESSAGE_BYTES: usize = 32_768;

/// Builds a condition; `status` is `"True"`, `"False"` or `"Unknown"`. A message longer than
/// the API server accepts is cut (with "…"), so one huge message cannot make the whole status
/// write fail.
pub fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: truncate(message.into(), MAX_MESSAGE_BYTES),
        observed_generation,
        last_transition_time: now,
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut with "…". For
/// every text with a size limit in the API (condition messages, Event notes).
pub fn truncate(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_longer_than_the_api_accepts_is_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let c = condition("Ready", "False", "Why", long, None, at(0));
        assert!(c.message.len() <= MAX_MESSAGE_BYTES);
        assert!(c.message.ends_with('…'));
        let short = condition("Ready", "False", "Why", "fine", None, at(0));
        assert_eq!(short.message, "fine");
    }

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).expect("valid timestamp"))
    }

    #[test]
    fn same_status_keeps_transition_time_and_reports_no_change() {
        let mut conditions = vec![condition(READY, "True", "Enforced", "ok", Some(1), at(10))];
        let changed = set_condition(
            &mut conditions,
            condition(READY, "True", "Enforced", "ok", Some(1), at(20)),
        );
        assert!(!changed);
        assert_eq!(conditions[0].last_transition_time, at(10));
    }

    #[test]
    fn new_status_moves_transition_time() {
        let mut conditions = vec![condition(READY, "True", "Enforced", "ok", Some(1), at(10))];
        assert!(set_condition(
            &mut conditions,
            condition(READY, "False", "Pending", "waiting", Some(2), at(20)),
        ));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, at(20));
        assert_eq!(conditions[0].reason, "Pending");
    }

    #[test]
    fn same_status_new_message_updates_in_place() {
        let mut conditions = vec![condition(READY, "False", "Pending", "a", Some(1), at(10))];
        assert!(set_condition(
            &mut conditions,
            condition(READY, "False", "Pending", "b", Some(2), at(20)),
        ));
        assert_eq!(conditions[0].message, "b");
        assert_eq!(conditions[0].observed_generation, Some(2));
        assert_eq!(conditions[0].last_transition_time, at(10));
    }

    #[test]
    fn other_types_are_appended() {
        let mut conditions = vec![condition(READY, "True", "Enforced", "ok", None, at(10))];
        assert!(set_condition(
            &mut conditions,
            condition(STALLED, "False", "Ok", "", None, at(10)),
        ));
        assert_eq!(conditions.len(), 2);
    }
}
