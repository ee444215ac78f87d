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

/// Builds a condition; `status` is `"True"`, `"False"` or `"Unknown"`.
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
        message: message.into(),
        observed_generation,
        last_transition_time: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
