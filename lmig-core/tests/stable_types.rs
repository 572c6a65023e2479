//! The settings are built outside the crate the one documented way
//! (`Default` plus `with_<field>` setters), and each setter sets its own
//! field and no other.

use std::time::Duration;

use lmig_core::session::{DestinationConfig, Mode, SourceConfig};
use lmig_core::{Fallback, PolicyConfig};

#[test]
fn source_config_setters_set_their_field() {
    let d = SourceConfig::default();
    let c = SourceConfig::default()
        .with_mode(Mode::Hybrid)
        .with_verify(!d.verify)
        .with_ready_timeout(Duration::from_millis(1))
        .with_done_timeout(Duration::from_millis(2))
        .with_batch_pages(3)
        .with_push_pages(4)
        .with_catch_up_timeout(Duration::from_millis(5))
        .with_max_freeze(Duration::from_millis(6));
    assert_eq!(c.mode, Mode::Hybrid);
    assert_eq!(c.verify, !d.verify);
    assert_eq!(c.ready_timeout, Duration::from_millis(1));
    assert_eq!(c.done_timeout, Duration::from_millis(2));
    assert_eq!(c.batch_pages, 3);
    assert_eq!(c.push_pages, 4);
    assert_eq!(c.catch_up_timeout, Duration::from_millis(5));
    assert_eq!(c.max_freeze, Some(Duration::from_millis(6)));
    assert_eq!(c.with_max_freeze(None).max_freeze, None);
}

#[test]
fn destination_config_setters_set_their_field() {
    let c = DestinationConfig::default()
        .with_idle_timeout(Duration::from_millis(1))
        .with_fault_poll(Duration::from_millis(2))
        .with_pause_limit(None);
    assert_eq!(c.idle_timeout, Duration::from_millis(1));
    assert_eq!(c.fault_poll, Duration::from_millis(2));
    assert_eq!(c.pause_limit, None);
    let c = c.with_pause_limit(Duration::from_millis(3));
    assert_eq!(c.pause_limit, Some(Duration::from_millis(3)));
}

#[test]
fn policy_config_setters_set_their_field() {
    let c = PolicyConfig::default()
        .with_downtime_target(Duration::from_millis(1))
        .with_max_rounds(2)
        .with_fallback(Fallback::Throttle)
        .with_fixed_freeze_cost(Duration::from_millis(3))
        .with_progress_ratio(0.25)
        .with_stall_rounds(4);
    assert_eq!(c.downtime_target, Duration::from_millis(1));
    assert_eq!(c.max_rounds, 2);
    assert_eq!(c.fallback, Fallback::Throttle);
    assert_eq!(c.fixed_freeze_cost, Duration::from_millis(3));
    assert_eq!(c.progress_ratio, 0.25);
    assert_eq!(c.stall_rounds, 4);
}
