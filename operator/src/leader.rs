//! Leader election over a `coordination.k8s.io/v1` Lease, so that two or more operator replicas
//! can run and only one writes.
//!
//! The semantics are client-go's `leaderelection`:
//!
//! - Every `retry_period` each candidate reads the Lease and [`decide`]s: create it, take it over
//!   (released, or not renewed for a lease duration), renew it (we hold it), or stand by.
//! - A write is a create or a replace with the `resourceVersion` just read, so of two candidates
//!   racing for the same Lease one gets `409 Conflict` and stays a candidate.
//! - Expiry is judged by the candidate's own monotonic clock: a Lease expires `leaseDurationSeconds`
//!   after the candidate *saw* it last change, never by comparing `renewTime` with the local wall
//!   clock, so clock skew between nodes cannot hand the lease over early.
//! - A leader acts only until its last successful renewal (the instant it sent the write) plus
//!   `renew_deadline`, which is shorter than the lease duration: it has stopped before any
//!   candidate may take over, even when the API server is unreachable.
//! - On shutdown the leader releases the Lease (clears `holderIdentity`), so a standby takes
//!   over at its next retry instead of a lease duration later.
//!
//! [`decide`] is a pure function of the Lease, our identity and the time; [`LeaderElector`] is
//! the thin layer that reads and writes the Lease and publishes [`Leadership`].
//!
//! The Lease carries the lease duration in whole seconds (rounded up from
//! [`Timing::lease_duration`]); candidates trust the number in the Lease, which is the holder's
//! promise, so replicas with different settings (during a rollout) stay safe.

use std::{future::Future, hash::BuildHasher as _, time::Duration};

use tokio::{sync::watch, time::Instant};
use tracing::Instrument as _;
use wgpin_crds::{
    k8s_openapi::{
        api::coordination::v1::{Lease, LeaseSpec},
        apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
        jiff::Timestamp,
    },
    kube::{self, Api, api::PostParams},
};

/// How long leases last and how often candidates try. Defaults are client-go's (15 s, 10 s,
/// 2 s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a standby waits, after it last saw the Lease change, before it takes the Lease
    /// over. Written into the Lease rounded up to whole seconds.
    pub lease_duration: Duration,
    /// How long a leader keeps acting after its last successful renewal. Shorter than
    /// `lease_duration`, so that it stops before anybody else may start.
    pub renew_deadline: Duration,
    /// How often a leader renews and a standby looks again (a standby adds up to 20% jitter so
    /// that candidates do not move in lockstep).
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl Timing {
    /// `lease_duration > renew_deadline > retry_period > 0`: otherwise a leader could still act
    /// when a standby takes over, or would give up before its first retry.
    pub fn validate(&self) -> Result<(), Error> {
        if self.retry_period.is_zero() {
            return Err(Error::Settings("the retry period must be positive".into()));
        }
        if self.renew_deadline <= self.retry_period {
            return Err(Error::Settings(format!(
                "the renew deadline ({:?}) must be longer than the retry period ({:?})",
                self.renew_deadline, self.retry_period
            )));
        }
        if self.lease_duration <= self.renew_deadline {
            return Err(Error::Settings(format!(
                "the lease duration ({:?}) must be longer than the renew deadline ({:?}), so a \
                 leader stops before another replica may take over",
                self.lease_duration, self.renew_deadline
            )));
        }
        Ok(())
    }

    /// `leaseDurationSeconds` for the Lease: whole seconds, rounded up so that candidates never
    /// wait less than we promised.
    pub fn lease_duration_seconds(&self) -> i32 {
        let seconds =
            self.lease_duration.as_secs() + u64::from(self.lease_duration.subsec_nanos() > 0);
        i32::try_from(seconds.max(1)).unwrap_or(i32::MAX)
    }
}

/// Which Lease, who we are, and the timing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Namespace of the Lease (usually the operator's own: `Client::default_namespace()`
    /// in a pod).
    pub namespace: String,
    /// Name of the Lease, the same for all replicas.
    pub lease_name: String,
    /// This replica's identity, unique per process (see [`default_identity`]).
    pub identity: String,
    pub timing: Timing,
}

impl Settings {
    /// Settings with the default timing.
    pub fn new(
        namespace: impl Into<String>,
        lease_name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            lease_name: lease_name.into(),
            identity: identity.into(),
            timing: Timing::default(),
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        for (what, value) in [
            ("namespace", &self.namespace),
            ("lease name", &self.lease_name),
            ("identity", &self.identity),
        ] {
            if value.is_empty() {
                return Err(Error::Settings(format!("the {what} must not be empty")));
            }
        }
        self.timing.validate()
    }
}

/// `<POD_NAME or hostname>_<8 random hex digits>`: readable in `kubectl get lease`, and unique
/// per process, so that two processes with one hostname (hostNetwork pods on one node, or a
/// restarted container whose predecessor still runs) never both believe they hold the Lease.
pub fn default_identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "wgpin-operator".to_string());
    identity_from(&base, random())
}

fn identity_from(base: &str, random: u64) -> String {
    format!("{base}_{:08x}", random & 0xffff_ffff)
}

/// Random enough for an identity suffix and jitter: `RandomState` is seeded from the OS.
fn random() -> u64 {
    std::hash::RandomState::new().hash_one((
        std::process::id(),
        std::time::SystemTime::now(),
        Instant::now(),
    ))
}

/// What to do with the Lease as just read.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// There is no Lease: create this one, naming us.
    Create(LeaseSpec),
    /// The Lease is released or has expired: replace it with this spec, naming us.
    TakeOver(LeaseSpec),
    /// We hold the Lease: replace it with this spec to renew it.
    Renew(LeaseSpec),
    /// Someone else holds a Lease that has not expired (by our clock, `expires_in` from now
    /// unless it is renewed).
    StandBy {
        holder: String,
        expires_in: Duration,
    },
}

/// The holder named in a Lease; an empty or missing `holderIdentity` means released.
fn holder(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()
        .and_then(|spec| spec.holder_identity.as_deref())
        .filter(|holder| !holder.is_empty())
}

/// Decides what to do with `current` (the Lease as just read, `None` when there is none).
///
/// `unchanged_for` is how long the Lease has looked exactly like this to us, by our monotonic
/// clock (client-go's "observed time"): another holder's Lease expires when that reaches its
/// `leaseDurationSeconds` (ours when it has none). `now` is the wall-clock time written into
/// `acquireTime` and `renewTime`, which are informational only.
pub fn decide(
    current: Option<&Lease>,
    identity: &str,
    unchanged_for: Duration,
    now: Timestamp,
    timing: &Timing,
) -> Decision {
    let now = MicroTime(now);
    let Some(lease) = current else {
        return Decision::Create(LeaseSpec {
            holder_identity: Some(identity.to_string()),
            lease_duration_seconds: Some(timing.lease_duration_seconds()),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(0),
            ..LeaseSpec::default()
        });
    };
    let old = lease.spec.clone().unwrap_or_default();
    match holder(lease) {
        Some(holder) if holder == identity => Decision::Renew(LeaseSpec {
            lease_duration_seconds: Some(timing.lease_duration_seconds()),
            acquire_time: old.acquire_time.clone().or_else(|| Some(now.clone())),
            renew_time: Some(now),
            ..old
        }),
        Some(holder) => {
            let duration = old
                .lease_duration_seconds
                .and_then(|seconds| u64::try_from(seconds).ok())
                .filter(|seconds| *seconds > 0)
                .map_or(timing.lease_duration, Duration::from_secs);
            if unchanged_for < duration {
                return Decision::StandBy {
                    holder: holder.to_string(),
                    expires_in: duration - unchanged_for,
                };
            }
            Decision::TakeOver(taken_over(old, identity, now, timing))
        }
        None => Decision::TakeOver(taken_over(old, identity, now, timing)),
    }
}

fn taken_over(old: LeaseSpec, identity: &str, now: MicroTime, timing: &Timing) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(timing.lease_duration_seconds()),
        acquire_time: Some(now.clone()),
        renew_time: Some(now),
        lease_transitions: Some(old.lease_transitions.unwrap_or(0).saturating_add(1)),
        ..old
    }
}

/// The spec that releases a Lease we hold: no holder, so candidates take it at once. The
/// transition count and acquire time stay as history.
pub fn released(spec: &LeaseSpec, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        renew_time: Some(MicroTime(now)),
        ..spec.clone()
    }
}

/// Tracks how long the Lease has looked the same, by the local monotonic clock.
#[derive(Debug, Default)]
struct Observation {
    seen: Option<(Option<LeaseSpec>, Instant)>,
}

impl Observation {
    /// Notes the Lease as read at `now`; returns how long it has looked exactly like this.
    fn observe(&mut self, lease: Option<&Lease>, now: Instant) -> Duration {
        let spec = lease.map(|lease| lease.spec.clone().unwrap_or_default());
        match &self.seen {
            Some((seen, since)) if *seen == spec => now.saturating_duration_since(*since),
            _ => {
                self.seen = Some((spec, now));
                Duration::ZERO
            }
        }
    }
}

/// Whether this replica may write now, as published by its [`LeaderElector`].
#[derive(Clone, Debug)]
pub struct Leadership {
    receiver: watch::Receiver<bool>,
}

impl Leadership {
    /// True while we hold the Lease and are within the renew deadline; false once the elector
    /// has stopped, whatever it said last.
    pub fn is_leader(&self) -> bool {
        !self.receiver.is_closed() && *self.receiver.borrow()
    }

    /// Waits until we are leader; false when the elector stopped first.
    pub async fn acquired(&mut self) -> bool {
        self.receiver.wait_for(|leader| *leader).await.is_ok()
    }

    /// Waits until we are no longer leader (or the elector has stopped).
    pub async fn lost(&mut self) {
        let _ = self.receiver.wait_for(|leader| !*leader).await;
    }

    /// The underlying channel, for `select!` loops that want `changed()`.
    pub fn receiver(&self) -> watch::Receiver<bool> {
        self.receiver.clone()
    }
}

/// Publishes `false` when dropped: an elector that is aborted or panics can no longer renew, so
/// whoever acts on its leadership must stop.
#[derive(Debug)]
struct Publisher(watch::Sender<bool>);

impl Drop for Publisher {
    fn drop(&mut self) {
        self.0.send_replace(false);
    }
}

/// Why leader election failed, saying what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid leader election settings: {0}")]
    Settings(String),
    #[error(
        "not allowed to {verb} the Lease {namespace}/{name} ({source}); the operator's RBAC needs \
         get, create and update on leases (apiGroups: [\"coordination.k8s.io\"]) in namespace \
         {namespace}"
    )]
    Forbidden {
        verb: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(
        "cannot create the Lease {namespace}/{name} ({source}); does namespace {namespace} exist? \
         The lease namespace must be an existing namespace, usually the operator's own"
    )]
    NamespaceNotFound {
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(
        "the API server rejected the Lease {namespace}/{name} ({source}); the lease name must be \
         a lowercase DNS subdomain name"
    )]
    Rejected {
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    /// Anything else: the elector logs it and retries.
    #[error("cannot {verb} the Lease {namespace}/{name}: {source}")]
    Api {
        verb: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
}

impl Error {
    /// Errors that retrying cannot fix: [`LeaderElector::run`] returns them.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Error::Api { .. })
    }
}

/// What one round against the API server came to.
enum Round {
    /// We wrote the Lease, naming us; the write was sent at `sent`.
    Leader { sent: Instant, transitions: i32 },
    /// Someone else holds it.
    StandBy {
        holder: String,
        expires_in: Duration,
    },
    /// Another write got in between our read and our write (409), or the Lease went away.
    Lost,
}

/// Runs the election for one replica; see the module documentation.
pub struct LeaderElector {
    api: Api<Lease>,
    settings: Settings,
    publisher: Publisher,
    observation: Observation,
    /// While leader: when we must stop acting unless renewed (monotonic clock).
    leader_until: Option<Instant>,
    /// We may have written the Lease naming us since we last saw another holder: release it on
    /// shutdown.
    maybe_holding: bool,
    /// The holder we last reported standing by for, to log once per holder.
    standing_by_for: Option<String>,
}

impl LeaderElector {
    /// An elector for `settings.lease_name` in `settings.namespace`, and the leadership it will
    /// publish (false until it has acquired the Lease).
    pub fn new(client: kube::Client, settings: Settings) -> Result<(Self, Leadership), Error> {
        settings.validate()?;
        let (sender, receiver) = watch::channel(false);
        let elector = Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            publisher: Publisher(sender),
            observation: Observation::default(),
            leader_until: None,
            maybe_holding: false,
            standing_by_for: None,
        };
        Ok((elector, Leadership { receiver }))
    }

    /// Another handle on the published leadership.
    pub fn leadership(&self) -> Leadership {
        Leadership {
            receiver: self.publisher.0.subscribe(),
        }
    }

    /// Takes part in the election until `shutdown` resolves, then stops acting (publishes
    /// `false`), releases the Lease if we hold it, and returns `Ok`. Returns an error (after
    /// publishing `false`) only for what retrying cannot fix: missing RBAC, a missing
    /// namespace, a rejected Lease; other API errors are logged and retried.
    ///
    /// Resolve `shutdown` only once the work done as leader has stopped writing: after the
    /// release another replica may start at once.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let span = tracing::info_span!(
            "leader_election",
            identity = %self.settings.identity,
            lease = %format!("{}/{}", self.settings.namespace, self.settings.lease_name),
        );
        async move {
            let result = self.elect(shutdown).await;
            // Stop acting before releasing: once released, a standby may start at once.
            match &result {
                Ok(()) => {
                    if self.leader_until.take().is_some() {
                        self.publisher.0.send_replace(false);
                        tracing::info!("stepped down to shut down");
                    }
                    if self.maybe_holding {
                        self.release().await;
                    }
                }
                Err(error) => self.step_down(&error.to_string()),
            }
            result
        }
        .instrument(span)
        .await
    }

    /// The election loop; returns when `shutdown` resolves or on a fatal error.
    async fn elect(&mut self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let timing = self.settings.timing;
        tokio::pin!(shutdown);
        loop {
            if self
                .leader_until
                .is_some_and(|until| until <= Instant::now())
            {
                self.step_down("no successful renewal within the renew deadline");
            }
            // A leader's round may not outlast its leadership; a candidate's is bounded too, so
            // that a hung request cannot stall the election.
            let bound = self
                .leader_until
                .unwrap_or_else(|| Instant::now() + timing.renew_deadline);
            let round = tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                round = tokio::time::timeout_at(bound, self.round()) => round,
            };
            match round {
                Ok(Ok(Round::Leader { sent, transitions })) => {
                    self.lead(sent + timing.renew_deadline, transitions);
                }
                Ok(Ok(Round::StandBy { holder, expires_in })) => {
                    self.stand_by(holder, expires_in);
                }
                Ok(Ok(Round::Lost)) => {
                    tracing::debug!("another write to the lease got in first");
                    self.step_down("another replica wrote the lease first");
                }
                Ok(Err(error)) if error.is_fatal() => return Err(error),
                Ok(Err(error)) => {
                    tracing::warn!(leader = self.leader_until.is_some(), "{error}; retrying");
                }
                Err(_) => tracing::warn!(
                    leader = self.leader_until.is_some(),
                    "the API server did not answer in time; retrying"
                ),
            }
            let wait = if self.leader_until.is_some() {
                timing.retry_period
            } else {
                jittered(timing.retry_period)
            };
            let next = Instant::now() + wait;
            loop {
                let deadline = self.leader_until.filter(|until| *until < next);
                tokio::select! {
                    biased;
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep_until(deadline.unwrap_or(next)), if deadline.is_some() => {
                        self.step_down("no successful renewal within the renew deadline");
                    }
                    () = tokio::time::sleep_until(next) => break,
                }
            }
        }
    }

    /// One round: read the Lease, decide, write.
    async fn round(&mut self) -> Result<Round, Error> {
        let name = self.settings.lease_name.clone();
        let current = self
            .api
            .get_opt(&name)
            .await
            .map_err(|e| self.error("get", e))?;
        let unchanged_for = self.observation.observe(current.as_ref(), Instant::now());
        let decision = decide(
            current.as_ref(),
            &self.settings.identity,
            unchanged_for,
            Timestamp::now(),
            &self.settings.timing,
        );
        let spec = match decision {
            Decision::StandBy { holder, expires_in } => {
                self.maybe_holding = false;
                return Ok(Round::StandBy { holder, expires_in });
            }
            Decision::Create(spec) | Decision::TakeOver(spec) | Decision::Renew(spec) => spec,
        };
        let transitions = spec.lease_transitions.unwrap_or(0);
        self.maybe_holding = true;
        // Leadership counts from before the write: a standby sees the new renewal no earlier.
        let sent = Instant::now();
        let (verb, written) = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name),
                        namespace: Some(self.settings.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                (
                    "create",
                    self.api.create(&PostParams::default(), &lease).await,
                )
            }
            Some(mut lease) => {
                // The resourceVersion just read stays in the metadata: a stale one gets 409.
                lease.spec = Some(spec);
                let written = self
                    .api
                    .replace(&name, &PostParams::default(), &lease)
                    .await;
                ("update", written)
            }
        };
        match written {
            Ok(_) => Ok(Round::Leader { sent, transitions }),
            Err(kube::Error::Api(status))
                if status.code == 409 || (status.code == 404 && verb == "update") =>
            {
                Ok(Round::Lost)
            }
            Err(e) => Err(self.error(verb, e)),
        }
    }

    fn lead(&mut self, until: Instant, transitions: i32) {
        if until <= Instant::now() {
            self.step_down("the renewal took longer than the renew deadline");
            return;
        }
        if self.leader_until.is_none() {
            tracing::info!(transitions, "became leader");
            self.publisher.0.send_replace(true);
        }
        self.leader_until = Some(until);
        self.standing_by_for = None;
    }

    fn stand_by(&mut self, holder: String, expires_in: Duration) {
        self.step_down(&format!("the lease is held by {holder}"));
        if self.standing_by_for.as_deref() != Some(holder.as_str()) {
            let until = Timestamp::now()
                .checked_add(expires_in)
                .map(|t| t.to_string())
                .unwrap_or_default();
            tracing::info!("standing by (held by {holder} until {until} unless renewed)");
            self.standing_by_for = Some(holder);
        }
    }

    fn step_down(&mut self, why: &str) {
        if self.leader_until.take().is_some() {
            self.publisher.0.send_replace(false);
            tracing::warn!("lost leadership: {why}");
        }
    }

    /// Clears `holderIdentity` if the Lease names us; bounded by the renew deadline. A failure
    /// only costs the standby a lease duration, so it is logged, not returned.
    async fn release(&mut self) {
        let timing = self.settings.timing;
        match tokio::time::timeout(timing.renew_deadline, self.try_release()).await {
            Ok(Ok(true)) => tracing::info!("released the lease"),
            Ok(Ok(false)) => tracing::debug!("not holding the lease; nothing to release"),
            Ok(Err(error)) => tracing::warn!(
                "could not release the lease ({error}); another replica takes over when it expires"
            ),
            Err(_) => tracing::warn!(
                "the API server did not answer in time; another replica takes over when the \
                 lease expires"
            ),
        }
    }

    async fn try_release(&self) -> Result<bool, Error> {
        let name = &self.settings.lease_name;
        let Some(mut lease) = self
            .api
            .get_opt(name)
            .await
            .map_err(|e| self.error("get", e))?
        else {
            return Ok(false);
        };
        if holder(&lease) != Some(self.settings.identity.as_str()) {
            return Ok(false);
        }
        let spec = released(&lease.spec.clone().unwrap_or_default(), Timestamp::now());
        lease.spec = Some(spec);
        self.api
            .replace(name, &PostParams::default(), &lease)
            .await
            .map_err(|e| self.error("update", e))?;
        Ok(true)
    }

    fn error(&self, verb: &'static str, source: kube::Error) -> Error {
        classify(&self.settings, verb, source)
    }
}

/// Turns an API error into one that says what to fix, when there is something to fix.
fn classify(settings: &Settings, verb: &'static str, source: kube::Error) -> Error {
    let namespace = settings.namespace.clone();
    let name = settings.lease_name.clone();
    let code = match &source {
        kube::Error::Api(status) => status.code,
        _ => 0,
    };
    // Boxed: the error travels through `Result`s on every round.
    let source = Box::new(source);
    match code {
        403 => Error::Forbidden {
            verb,
            namespace,
            name,
            source,
        },
        404 if verb == "create" => Error::NamespaceNotFound {
            namespace,
            name,
            source,
        },
        400 | 422 => Error::Rejected {
            namespace,
            name,
            source,
        },
        _ => Error::Api {
            verb,
            namespace,
            name,
            source,
        },
    }
}

/// `period` plus up to 20%, so that standbys do not all try at the same instant.
fn jittered(period: Duration) -> Duration {
    let fraction = (random() % 1_000) as u32;
    period + period / 5 * fraction / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "me_0000abcd";
    const OTHER: &str = "other_1234beef";

    fn timing() -> Timing {
        Timing {
            lease_duration: Duration::from_millis(1_500),
            renew_deadline: Duration::from_secs(1),
            retry_period: Duration::from_millis(200),
        }
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + second).expect("timestamp")
    }

    fn micro(second: i64) -> Option<MicroTime> {
        Some(MicroTime(at(second)))
    }

    fn lease(holder: Option<&str>, seconds: Option<i32>, transitions: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("wgpin-operator".into()),
                resource_version: Some("7".into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: seconds,
                acquire_time: micro(0),
                renew_time: micro(10),
                lease_transitions: Some(transitions),
                ..LeaseSpec::default()
            }),
        }
    }

    fn held_by(holder: &str, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(2),
            acquire_time: micro(100),
            renew_time: micro(100),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions() {
        let ms = Duration::from_millis;
        let renewed_by_me = LeaseSpec {
            acquire_time: micro(0),
            ..held_by(ME, 3)
        };
        let no_spec = Lease {
            spec: None,
            ..lease(None, None, 0)
        };
        let cases: Vec<(&str, Option<Lease>, Duration, Decision)> = vec![
            (
                "no lease: create it, no transitions yet",
                None,
                ms(0),
                Decision::Create(held_by(ME, 0)),
            ),
            (
                "ours: renew, keeping acquire time and transitions",
                Some(lease(Some(ME), Some(2), 3)),
                ms(0),
                Decision::Renew(renewed_by_me.clone()),
            ),
            (
                "ours, not renewed for ages: still ours to renew",
                Some(lease(Some(ME), Some(2), 3)),
                ms(60_000),
                Decision::Renew(renewed_by_me),
            ),
            (
                "another holder, just seen: stand by for its lease's 5 s",
                Some(lease(Some(OTHER), Some(5), 3)),
                ms(0),
                Decision::StandBy {
                    holder: OTHER.into(),
                    expires_in: ms(5_000),
                },
            ),
            (
                "another holder's lease counts, not our shorter 1.5 s",
                Some(lease(Some(OTHER), Some(5), 3)),
                ms(4_999),
                Decision::StandBy {
                    holder: OTHER.into(),
                    expires_in: ms(1),
                },
            ),
            (
                "another holder, unchanged for its lease duration: take over, one more transition",
                Some(lease(Some(OTHER), Some(5), 3)),
                ms(5_000),
                Decision::TakeOver(held_by(ME, 4)),
            ),
            (
                "another holder without a duration: ours (1.5 s) applies",
                Some(lease(Some(OTHER), None, 3)),
                ms(1_499),
                Decision::StandBy {
                    holder: OTHER.into(),
                    expires_in: ms(1),
                },
            ),
            (
                "another holder without a duration, unchanged for ours: take over",
                Some(lease(Some(OTHER), None, 3)),
                ms(1_500),
                Decision::TakeOver(held_by(ME, 4)),
            ),
            (
                "a nonsense duration is ignored",
                Some(lease(Some(OTHER), Some(-3), 3)),
                ms(1_000),
                Decision::StandBy {
                    holder: OTHER.into(),
                    expires_in: ms(500),
                },
            ),
            (
                "released (no holder): take over at once",
                Some(lease(None, Some(5), 3)),
                ms(0),
                Decision::TakeOver(held_by(ME, 4)),
            ),
            (
                "released (empty holder): take over at once",
                Some(lease(Some(""), Some(5), 3)),
                ms(0),
                Decision::TakeOver(held_by(ME, 4)),
            ),
            (
                "a lease without a spec: take it over",
                Some(no_spec),
                ms(0),
                Decision::TakeOver(held_by(ME, 1)),
            ),
            (
                "the transition count does not overflow",
                Some(lease(None, Some(5), i32::MAX)),
                ms(0),
                Decision::TakeOver(held_by(ME, i32::MAX)),
            ),
        ];
        for (name, current, unchanged_for, expected) in cases {
            let decision = decide(current.as_ref(), ME, unchanged_for, at(100), &timing());
            assert_eq!(decision, expected, "{name}");
        }
    }

    #[test]
    fn renewing_fills_a_missing_acquire_time_and_keeps_other_fields() {
        let mut current = lease(Some(ME), Some(2), 1);
        if let Some(spec) = current.spec.as_mut() {
            spec.acquire_time = None;
            spec.strategy = Some("OldestEmulationVersion".into());
        }
        let Decision::Renew(spec) = decide(Some(&current), ME, Duration::ZERO, at(50), &timing())
        else {
            panic!("expected a renewal");
        };
        assert_eq!(spec.acquire_time, micro(50));
        assert_eq!(spec.renew_time, micro(50));
        assert_eq!(spec.strategy.as_deref(), Some("OldestEmulationVersion"));
    }

    #[test]
    fn release_clears_the_holder_and_keeps_the_history() {
        let spec = held_by(ME, 4);
        let released = released(&spec, at(200));
        assert_eq!(released.holder_identity, None);
        assert_eq!(released.renew_time, micro(200));
        assert_eq!(released.acquire_time, spec.acquire_time);
        assert_eq!(released.lease_transitions, Some(4));
        // Whoever reads it next takes it over at once.
        let lease = Lease {
            spec: Some(released),
            ..Lease::default()
        };
        assert_eq!(
            decide(Some(&lease), OTHER, Duration::ZERO, at(201), &timing()),
            Decision::TakeOver(LeaseSpec {
                holder_identity: Some(OTHER.into()),
                acquire_time: micro(201),
                renew_time: micro(201),
                lease_transitions: Some(5),
                ..held_by(OTHER, 0)
            })
        );
    }

    #[test]
    fn lease_duration_is_written_in_whole_seconds_rounded_up() {
        let seconds = |ms| {
            Timing {
                lease_duration: Duration::from_millis(ms),
                ..timing()
            }
            .lease_duration_seconds()
        };
        assert_eq!(seconds(1), 1);
        assert_eq!(seconds(400), 1);
        assert_eq!(seconds(1_000), 1);
        assert_eq!(seconds(1_001), 2);
        assert_eq!(seconds(15_000), 15);
    }

    #[test]
    fn timing_must_let_a_leader_stop_before_a_takeover() {
        let ms = Duration::from_millis;
        assert!(Timing::default().validate().is_ok());
        assert!(timing().validate().is_ok());
        for (lease_duration, renew_deadline, retry_period) in [
            (ms(1_000), ms(1_000), ms(100)),
            (ms(1_000), ms(1_200), ms(100)),
            (ms(1_000), ms(500), ms(500)),
            (ms(1_000), ms(500), ms(0)),
        ] {
            let timing = Timing {
                lease_duration,
                renew_deadline,
                retry_period,
            };
            assert!(
                matches!(timing.validate(), Err(Error::Settings(_))),
                "{timing:?}"
            );
        }
        let mut settings = Settings::new("wgpin", "wgpin-operator", "");
        assert!(settings.validate().is_err());
        settings.identity = ME.into();
        assert!(settings.validate().is_ok());
    }

    #[test]
    fn observation_counts_from_the_last_change() {
        let start = Instant::now();
        let later = |ms| start + Duration::from_millis(ms);
        let mut observation = Observation::default();
        let first = lease(Some(OTHER), Some(2), 0);
        let mut renewed = first.clone();
        if let Some(spec) = renewed.spec.as_mut() {
            spec.renew_time = micro(11);
        }
        assert_eq!(observation.observe(None, later(0)), Duration::ZERO);
        assert_eq!(
            observation.observe(Some(&first), later(100)),
            Duration::ZERO
        );
        assert_eq!(
            observation.observe(Some(&first), later(400)),
            Duration::from_millis(300)
        );
        // A renewal restarts the count; so does the holder's clock jumping backwards.
        assert_eq!(
            observation.observe(Some(&renewed), later(500)),
            Duration::ZERO
        );
        assert_eq!(
            observation.observe(Some(&renewed), later(2_500)),
            Duration::from_secs(2)
        );
        assert_eq!(
            observation.observe(Some(&first), later(2_600)),
            Duration::ZERO
        );
    }

    #[test]
    fn identities_name_the_pod_and_differ_per_process() {
        assert_eq!(
            identity_from("wgpin-operator-7d9f-x2x", 0x1234_5678_9abc_def0),
            "wgpin-operator-7d9f-x2x_9abcdef0"
        );
        assert_eq!(identity_from("pod", 0xa), "pod_0000000a");
        let one = default_identity();
        let two = default_identity();
        assert!(one.contains('_') && !one.starts_with('_'), "{one}");
        assert_ne!(one, two);
    }

    #[test]
    fn jitter_stays_within_a_fifth_of_the_period() {
        let period = Duration::from_millis(100);
        for _ in 0..100 {
            let wait = jittered(period);
            assert!(
                wait >= period && wait <= Duration::from_millis(120),
                "{wait:?}"
            );
        }
    }

    #[test]
    fn errors_say_what_to_fix() {
        let status = |code| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                message: "leases.coordination.k8s.io is forbidden".into(),
                ..kube::core::Status::default()
            }))
        };
        let settings = Settings::new("wgpin", "wgpin-operator", ME);
        let classify = |verb, code| classify(&settings, verb, status(code));
        let forbidden = classify("get", 403);
        assert!(forbidden.is_fatal());
        let message = forbidden.to_string();
        for part in [
            "get",
            "create",
            "update",
            "leases",
            "coordination.k8s.io",
            "wgpin/wgpin-operator",
            "namespace wgpin",
        ] {
            assert!(message.contains(part), "{part:?} missing from {message}");
        }
        assert!(matches!(
            classify("create", 404),
            Error::NamespaceNotFound { .. }
        ));
        assert!(matches!(classify("update", 422), Error::Rejected { .. }));
        assert!(!classify("update", 500).is_fatal());
        assert!(!classify("get", 429).is_fatal());
    }
}
