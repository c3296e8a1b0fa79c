//! Creating a shard attempt's batch exactly once.
//!
//! 1. Where the provider's batches carry no shard key (Anthropic), the submitter first takes
//!    the provider's create mutex (`lease.create.<provider>`): one create at a time, so that a
//!    claim's time window holds no other shard's batch of ours.
//! 2. It claims the shard attempt by compare-and-set on the shard record (`creating`: owner,
//!    since, until). A delivery that finds another owner's live claim waits for it; one that
//!    finds an expired claim looks for a batch created in that claim's window before it
//!    creates (reconciliation), because the claimant may have created it and died.
//! 3. Create is never retried blindly: a failure that may have taken effect (timeout, dropped
//!    connection, 5xx) keeps the claim for `creation.unconfirmed_wait` and ends the delivery;
//!    the next one reconciles.
//! 4. The batch id is recorded by compare-and-set, riding out a NATS outage for up to the
//!    lease: the create cannot be undone, and a delivery that gave up here would leave its
//!    claim to run out before anyone looked for the batch.
//! 5. A delivery that fails while it holds the claim (NATS or the store down before the
//!    create, say) leaves it behind as abandoned in this process: the next delivery of the
//!    shard here reconciles at once instead of waiting out the lease. (In another process it
//!    waits: only this one knows the claimant is gone.)
//!
//! The batch id, once recorded, is final. A batch found or created besides the
//!    recorded one is an orphan: cancelled where it is surely ours, reported as an event and a
//!    metric, and kept in the shard record. What a cancelled orphan answered before its cancel
//!    is collected by the poller and fills the rows the recorded batch failed.
//!

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rowsmith_bus::Cas;
use rowsmith_bus::step::StepError;
use rowsmith_contract::events::{Event, EventKind};
use rowsmith_contract::messages::ShardKey;
use rowsmith_contract::records::{
    CreateClaim, CreateMutex, ShardRecord, ShardState, batch_owner_key, create_mutex_key, shard_key,
};
use rowsmith_providers::{
    BatchProvider, BatchRef, CreateWindow, Provider, ProviderError, ShardLines,
};

use crate::Submitter;

/// How the batch of a shard attempt came to be known.
#[derive(Debug)]
pub enum Creation {
    /// Recorded (now or before) under this id.
    Recorded(String),
    /// Not now: another delivery is creating it, or a create may still take effect; ask again
    /// after this long.
    Later(Duration),
    /// A look found no batch and `create` was false: nothing exists for this shard attempt.
    NoneExists,
}

/// What the claim step found.
enum Claim {
    Recorded(String),
    HeldElsewhere {
        until_ms: i64,
    },
    /// This delivery holds the claim; `reconcile` is the window of an earlier, expired claim
    /// whose create may have taken effect.
    Mine {
        reconcile: Option<CreateWindow>,
    },
}

/// Owners (deliveries) of this process that failed while holding a creation claim or the
/// create mutex: nothing of theirs still runs, so a later delivery of the same shard may take
/// over their claim at once. Deliberate holds (an unconfirmed create) are never abandoned.
#[derive(Debug, Clone, Default)]
pub struct AbandonedClaims(Arc<Mutex<HashSet<String>>>);

impl AbandonedClaims {
    /// Past this many, the oldest knowledge is dropped: such claims just run out.
    const MAX: usize = 10_000;

    fn abandon(&self, owner: &str) {
        let mut owners = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if owners.len() >= Self::MAX {
            owners.clear();
        }
        owners.insert(owner.to_owned());
    }

    fn is_abandoned(&self, owner: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(owner)
    }

    fn forget(&self, owner: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(owner);
    }
}

/// Makes sure the shard attempt has exactly one batch: finds the one an earlier delivery
/// created, or (when `create`) creates it. `owner` names this delivery.
pub async fn ensure_batch(
    submitter: &Submitter,
    provider: &Provider,
    model: &str,
    record: &ShardRecord,
    owner: &str,
    create: bool,
) -> Result<Creation, StepError> {
    let outcome = ensure_batch_once(submitter, provider, model, record, owner, create).await;
    if outcome.is_err() {
        submitter.abandoned.abandon(owner);
    }
    outcome
}

async fn ensure_batch_once(
    submitter: &Submitter,
    provider: &Provider,
    model: &str,
    record: &ShardRecord,
    owner: &str,
    create: bool,
) -> Result<Creation, StepError> {
    let key = &record.key;
    let mutex = (!provider.tags_batches()).then(|| create_mutex_key(provider.name()));
    if let Some(mutex_key) = &mutex
        && let Some(until_ms) = take_mutex(submitter, mutex_key, owner, key).await?
    {
        return Ok(Creation::Later(wait_until(until_ms)));
    }
    let outcome = claim_and_create(submitter, (provider, model), record, owner, create).await;
    match (&mutex, outcome) {
        // An unconfirmed create keeps the mutex as long as the claim: no other create may
        // land in the window that the next look at this shard searches.
        (Some(mutex_key), Ok(Step::Unconfirmed { wait, until_ms })) => {
            // Not an error of the delivery: a failed hold leaves the mutex to its lease,
            // which is longer, and the claim must never count as abandoned.
            if let Err(error) = hold_mutex_until(submitter, mutex_key, owner, until_ms).await {
                tracing::warn!(%error, "could not shorten the create mutex to the unconfirmed wait");
            }
            Ok(Creation::Later(wait))
        }
        (None, Ok(Step::Unconfirmed { wait, .. })) => Ok(Creation::Later(wait)),
        (Some(mutex_key), outcome) => {
            release_mutex(submitter, mutex_key, owner).await?;
            outcome.map(Step::into_creation)
        }
        (None, outcome) => outcome.map(Step::into_creation),
    }
}

/// How one claim-and-create went.
enum Step {
    Done(Creation),
    /// The create may have taken effect; the claim holds until `until_ms`.
    Unconfirmed {
        wait: Duration,
        until_ms: i64,
    },
}

impl Step {
    fn into_creation(self) -> Creation {
        match self {
            Step::Done(creation) => creation,
            Step::Unconfirmed { wait, .. } => Creation::Later(wait),
        }
    }
}

async fn claim_and_create(
    submitter: &Submitter,
    (provider, model): (&Provider, &str),
    record: &ShardRecord,
    owner: &str,
    create: bool,
) -> Result<Step, StepError> {
    let key = &record.key;
    let lease = submitter.creation.lease;
    let reconcile = match claim(submitter, key, owner, lease, record.request_count).await? {
        Claim::Recorded(batch_id) => return Ok(Step::Done(Creation::Recorded(batch_id))),
        Claim::HeldElsewhere { until_ms } => {
            return Ok(Step::Done(Creation::Later(wait_until(until_ms))));
        }
        Claim::Mine { reconcile } => reconcile,
    };
    if let Some(window) = reconcile {
        let mut found =
            unowned(submitter, provider, key, provider.find(key, &window).await?).await?;
        if !found.is_empty() {
            let adopted = found.remove(0);
            tracing::info!(job_id = %key.job_id, shard = key.shard, batch_id = %adopted.id, "found the batch an earlier delivery created, not creating another");
            let recorded = record_batch(submitter, provider, key, &adopted.id).await?;
            for extra in found {
                report_orphan(submitter, provider, key, &extra, provider.tags_batches()).await;
            }
            return orphan_unless_recorded(submitter, provider, key, adopted, recorded).await;
        }
        // Nothing came of the earlier claim: this delivery's claim is a fresh one.
        renew_claim(submitter, key, owner, lease).await?;
    }
    if !create {
        release_claim(submitter, key, owner).await?;
        return Ok(Step::Done(Creation::NoneExists));
    }
    // A zombie (a paused process whose claim expired meanwhile) must not create now.
    if !still_mine(submitter, key, owner).await? {
        return Ok(Step::Done(Creation::Later(Duration::from_secs(1))));
    }
    let file_id = record.provider_file_id.clone().unwrap_or_default();
    // Read only by the APIs that take the requests in the create call, as they send them.
    let lines = ShardLines::object(&submitter.store, &record.requests_path).await?;
    let created = match create_holding_claim(
        submitter,
        provider,
        key,
        owner,
        (model, &file_id),
        lines,
    )
    .await
    {
        Ok(created) => created,
        Err(error) if error.is_unconfirmed() => {
            let wait = submitter.creation.unconfirmed_wait;
            let until_ms = rowsmith_contract::now_unix_ms() + wait.as_millis() as i64;
            // A failed hold leaves the claim to its lease (longer); the create may still take
            // effect, so this delivery must not end in an error that abandons the claim.
            if let Err(error) = hold_claim_until(submitter, key, owner, until_ms).await {
                tracing::warn!(%error, "could not shorten the creation claim to the unconfirmed wait");
            }
            tracing::warn!(job_id = %key.job_id, shard = key.shard, %error, ?wait, "batch create unconfirmed; will look for it before creating again");
            return Ok(Step::Unconfirmed { wait, until_ms });
        }
        Err(error) if error.is_input_gone() => {
            // Nothing was created, and the file will not come back: upload it again.
            release_claim(submitter, key, owner).await?;
            forget_file(submitter, key, &file_id).await?;
            tracing::warn!(job_id = %key.job_id, shard = key.shard, %error, "the uploaded shard is gone; uploading it again");
            return Ok(Step::Done(Creation::Later(Duration::ZERO)));
        }
        Err(error) => {
            // Refused outright (a 4xx): nothing was created.
            release_claim(submitter, key, owner).await?;
            return Err(error.into());
        }
    };
    chaos_crash(submitter, key, &created.id);
    let recorded = record_created(submitter, provider, key, &created.id).await?;
    orphan_unless_recorded(submitter, provider, key, created, recorded).await
}

/// Clears the shard's uploaded file id (when it is still `file_id`), so that the next
/// delivery uploads the shard again.
async fn forget_file(
    submitter: &Submitter,
    key: &ShardKey,
    file_id: &str,
) -> Result<(), StepError> {
    submitter
        .bus
        .modify(
            &shard_key(key),
            |shard: &mut ShardRecord| -> Result<Cas<()>, StepError> {
                if shard.provider_file_id.as_deref() != Some(file_id) {
                    return Ok(Cas::Keep(()));
                }
                shard.provider_file_id = None;
                Ok(Cas::Write(()))
            },
        )
        .await
}

/// Calls create while renewing this delivery's claim (and the provider's create mutex, where
/// there is one) every third of the lease, so that a create slower than the lease (a large
/// body on a slow link) is not taken for a dead one and reconciled under it. A paused process
/// renews nothing, and its claim runs out as it should.
async fn create_holding_claim(
    submitter: &Submitter,
    provider: &Provider,
    key: &ShardKey,
    owner: &str,
    (model, file_id): (&str, &str),
    lines: ShardLines,
) -> Result<BatchRef, ProviderError> {
    let lease = submitter.creation.lease;
    let mutex = (!provider.tags_batches()).then(|| create_mutex_key(provider.name()));
    let create = provider.create(key, model, file_id, lines);
    tokio::pin!(create);
    let mut renew = tokio::time::interval((lease / 3).max(Duration::from_millis(100)));
    renew.tick().await;
    loop {
        tokio::select! {
            created = &mut create => return created,
            _ = renew.tick() => {
                let until_ms = rowsmith_contract::now_unix_ms() + lease.as_millis() as i64;
                let renewed = match &mutex {
                    Some(mutex_key) => hold_mutex_until(submitter, mutex_key, owner, until_ms).await,
                    None => Ok(()),
                };
                if let Err(error) = renewed.and(hold_claim_until(submitter, key, owner, until_ms).await) {
                    tracing::warn!(job_id = %key.job_id, shard = key.shard, %error, "could not renew the creation claim");
                }
            }
        }
    }
}

/// The recorded id; a `batch` that is not it is an orphan.
async fn orphan_unless_recorded(
    submitter: &Submitter,
    provider: &Provider,
    key: &ShardKey,
    batch: BatchRef,
    recorded: String,
) -> Result<Step, StepError> {
    if batch.id != recorded {
        report_orphan(submitter, provider, key, &batch, true).await;
    }
    Ok(Step::Done(Creation::Recorded(recorded)))
}

/// How long to wait for a claim or mutex that holds until `until_ms`: its holder usually
/// finishes long before the lease ends, so look again within a second.
fn wait_until(until_ms: i64) -> Duration {
    let left = until_ms
        .saturating_sub(rowsmith_contract::now_unix_ms())
        .max(0) as u64;
    Duration::from_millis(left).clamp(Duration::from_millis(200), Duration::from_secs(1))
}

async fn claim(
    submitter: &Submitter,
    key: &ShardKey,
    owner: &str,
    lease: Duration,
    request_count: u64,
) -> Result<Claim, StepError> {
    let abandoned = &submitter.abandoned;
    let taken_from = std::sync::Mutex::new(None::<String>);
    let claim = submitter
        .bus
        .modify(
            &shard_key(key),
            |shard: &mut ShardRecord| -> Result<Cas<Claim>, StepError> {
                if let Some(batch_id) = &shard.provider_batch_id {
                    return Ok(Cas::Keep(Claim::Recorded(batch_id.clone())));
                }
                let now = rowsmith_contract::now_unix_ms();
                let earlier = match &shard.creating {
                    Some(claim) if claim.owner == owner => None,
                    Some(claim) if claim.is_live(now) && !abandoned.is_abandoned(&claim.owner) => {
                        return Ok(Cas::Keep(Claim::HeldElsewhere {
                            until_ms: claim.until_ms,
                        }));
                    }
                    Some(claim) => {
                        *taken_from.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(claim.owner.clone());
                        Some(CreateWindow {
                            since_ms: claim.since_ms,
                            until_ms: claim.until_ms.min(now),
                            request_count,
                            file_id: shard.provider_file_id.clone(),
                        })
                    }
                    None => None,
                };
                // While reconciling, the earlier claim's start is kept: if this delivery dies
                // too, the next one searches from there.
                let since_ms = earlier.as_ref().map_or(now, |window| window.since_ms);
                shard.creating = Some(CreateClaim {
                    owner: owner.to_owned(),
                    since_ms,
                    until_ms: now + lease.as_millis() as i64,
                });
                Ok(Cas::Write(Claim::Mine { reconcile: earlier }))
            },
        )
        .await?;
    if let Some(earlier) = taken_from.into_inner().unwrap_or_else(|e| e.into_inner()) {
        abandoned.forget(&earlier);
    }
    Ok(claim)
}

/// Changes this delivery's claim, if it still holds it.
async fn change_claim(
    submitter: &Submitter,
    key: &ShardKey,
    owner: &str,
    change: impl Fn(&mut Option<CreateClaim>),
) -> Result<bool, StepError> {
    submitter
        .bus
        .modify(
            &shard_key(key),
            |shard: &mut ShardRecord| -> Result<Cas<bool>, StepError> {
                match &shard.creating {
                    Some(claim) if claim.owner == owner => {
                        change(&mut shard.creating);
                        Ok(Cas::Write(true))
                    }
                    _ => Ok(Cas::Keep(false)),
                }
            },
        )
        .await
}

async fn renew_claim(
    submitter: &Submitter,
    key: &ShardKey,
    owner: &str,
    lease: Duration,
) -> Result<(), StepError> {
    let now = rowsmith_contract::now_unix_ms();
    change_claim(submitter, key, owner, |claim| {
        if let Some(claim) = claim {
            claim.since_ms = now;
            claim.until_ms = now + lease.as_millis() as i64;
        }
    })
    .await
    .map(drop)
}

async fn hold_claim_until(
    submitter: &Submitter,
    key: &ShardKey,
    owner: &str,
    until_ms: i64,
) -> Result<(), StepError> {
    change_claim(submitter, key, owner, |claim| {
        if let Some(claim) = claim {
            claim.until_ms = until_ms;
        }
    })
    .await
    .map(drop)
}

async fn release_claim(
    submitter: &Submitter,
    key: &ShardKey,
    owner: &str,
) -> Result<(), StepError> {
    change_claim(submitter, key, owner, |claim| *claim = None)
        .await
        .map(drop)
}

async fn still_mine(submitter: &Submitter, key: &ShardKey, owner: &str) -> Result<bool, StepError> {
    let now = rowsmith_contract::now_unix_ms();
    Ok(submitter
        .bus
        .read::<ShardRecord>(&shard_key(key))
        .await?
        .and_then(|(shard, _)| shard.creating)
        .is_some_and(|claim| claim.owner == owner && claim.is_live(now)))
}

/// The found batches that are not recorded for another shard (only providers without shard
/// keys keep that record).
async fn unowned(
    submitter: &Submitter,
    provider: &Provider,
    key: &ShardKey,
    found: Vec<BatchRef>,
) -> Result<Vec<BatchRef>, StepError> {
    if provider.tags_batches() {
        return Ok(found);
    }
    let mine = key.dotted();
    let mut kept = Vec::new();
    for batch in found {
        let owner = submitter
            .bus
            .read::<String>(&batch_owner_key(provider.name(), &batch.id))
            .await?;
        match owner {
            Some((owner, _)) if owner != mine => {
                tracing::debug!(batch_id = %batch.id, %owner, "batch in the window is another shard's");
            }
            _ => kept.push(batch),
        }
    }
    Ok(kept)
}

/// Records the batch this delivery just created, trying again through a NATS outage for up
/// to `creation.lease`: until then the claim (renewed during the create) keeps every other
/// delivery waiting, so giving up sooner would only leave the shard stalled until the claim
/// runs out. A delivery that takes over after the lease finds the batch by reconciliation.
async fn record_created(
    submitter: &Submitter,
    provider: &Provider,
    key: &ShardKey,
    batch_id: &str,
) -> Result<String, StepError> {
    let deadline = tokio::time::Instant::now() + submitter.creation.lease;
    let mut pause = Duration::from_millis(100);
    loop {
        match record_batch(submitter, provider, key, batch_id).await {
            Err(error)
                if error.is_retryable() && tokio::time::Instant::now() + pause < deadline =>
            {
                tracing::warn!(job_id = %key.job_id, shard = key.shard, batch_id, %error, "could not record the created batch yet; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            outcome => return outcome,
        }
    }
}

/// Records `batch_id` unless another is recorded already; returns the recorded one.
async fn record_batch(
    submitter: &Submitter,
    provider: &Provider,
    key: &ShardKey,
    batch_id: &str,
) -> Result<String, StepError> {
    if !provider.tags_batches() {
        // Before the shard record: once the shard shows the batch, no other shard may take it.
        let owner_key = batch_owner_key(provider.name(), batch_id);
        if !submitter.bus.create(&owner_key, &key.dotted()).await? {
            let owner = submitter
                .bus
                .read::<String>(&owner_key)
                .await?
                .map(|(o, _)| o);
            if owner.as_deref() != Some(key.dotted().as_str()) {
                return Err(StepError::Internal(format!(
                    "batch {batch_id} is recorded for shard {} already",
                    owner.unwrap_or_default()
                )));
            }
        }
    }
    submitter
        .bus
        .modify(
            &shard_key(key),
            |shard: &mut ShardRecord| -> Result<Cas<String>, StepError> {
                if let Some(existing) = &shard.provider_batch_id {
                    return Ok(Cas::Keep(existing.clone()));
                }
                shard
                    .transition(ShardState::Submitted)
                    .map_err(|e| StepError::Job(e.to_string()))?;
                shard.provider_batch_id = Some(batch_id.to_owned());
                shard.creating = None;
                Ok(Cas::Write(batch_id.to_owned()))
            },
        )
        .await
}

/// A batch for this shard attempt besides the recorded one: cancelled when it is surely ours
/// (`cancel`; the merger then uses what it answered), reported always, and kept in the shard
/// record.
async fn report_orphan(
    submitter: &Submitter,
    provider: &Provider,
    key: &ShardKey,
    batch: &BatchRef,
    cancel: bool,
) {
    metrics::counter!("rowsmith_orphan_batches_total", "provider" => provider.name().to_owned())
        .increment(1);
    let cancelled = match cancel {
        true => match provider.cancel(batch).await {
            Ok(()) => "cancelled",
            Err(error) => {
                tracing::error!(batch_id = %batch.id, %error, "could not cancel an orphan batch");
                "could not be cancelled (cancel it by hand)"
            }
        },
        false => "not cancelled: it carries no shard key, so it may not be rowsmith's",
    };
    let orphan = batch.id.clone();
    let noted = submitter
        .bus
        .modify(
            &shard_key(key),
            |shard: &mut ShardRecord| -> Result<Cas<()>, StepError> {
                let own = cancel && !shard.own_orphans.contains(&orphan);
                if shard.orphan_batches.contains(&orphan) && !own {
                    return Ok(Cas::Keep(()));
                }
                if !shard.orphan_batches.contains(&orphan) {
                    shard.orphan_batches.push(orphan.clone());
                }
                if own {
                    shard.own_orphans.push(orphan.clone());
                }
                Ok(Cas::Write(()))
            },
        )
        .await;
    if let Err(error) = noted {
        tracing::warn!(batch_id = %batch.id, %error, "could not note the orphan batch in the shard record");
    }
    let message = format!(
        "a second batch {} was made for shard {} of attempt {}; {cancelled}",
        batch.id, key.shard, key.attempt
    );
    tracing::warn!(job_id = %key.job_id, shard = key.shard, batch_id = %batch.id, cancelled, "orphan batch");
    submitter
        .bus
        .emit(
            &Event::new(&key.job_id, EventKind::Warning, message, Default::default())
                .with_shard(key.clone()),
        )
        .await;
}

/// Takes the provider's create mutex; `Some(until)` while another delivery holds it.
async fn take_mutex(
    submitter: &Submitter,
    mutex_key: &str,
    owner: &str,
    key: &ShardKey,
) -> Result<Option<i64>, StepError> {
    let bus = &submitter.bus;
    let now = rowsmith_contract::now_unix_ms();
    let mine = CreateMutex {
        owner: owner.to_owned(),
        shard: key.dotted(),
        until_ms: now + submitter.creation.lease.as_millis() as i64,
    };
    if bus.create(mutex_key, &mine).await? {
        return Ok(None);
    }
    bus.modify(
        mutex_key,
        |mutex: &mut CreateMutex| -> Result<Cas<Option<i64>>, StepError> {
            // A mutex that ran out (its holder died, or its create was unconfirmed) stays
            // taken a little longer, so that no create lands within the clock margin of the
            // window its shard will search.
            let gap = match mutex.until_ms {
                0 => 0,
                _ => CreateWindow::MEASURED_SKEW_MS * 2,
            };
            // This shard's own delivery that failed holding it: nothing of it still runs,
            // and no other create landed in its window since.
            let own_abandoned =
                mutex.shard == mine.shard && submitter.abandoned.is_abandoned(&mutex.owner);
            if mutex.owner != owner
                && !own_abandoned
                && mutex.until_ms + gap > rowsmith_contract::now_unix_ms()
            {
                return Ok(Cas::Keep(Some(mutex.until_ms + gap)));
            }
            *mutex = mine.clone();
            Ok(Cas::Write(None))
        },
    )
    .await
}

async fn release_mutex(
    submitter: &Submitter,
    mutex_key: &str,
    owner: &str,
) -> Result<(), StepError> {
    hold_mutex_until(submitter, mutex_key, owner, 0).await
}

async fn hold_mutex_until(
    submitter: &Submitter,
    mutex_key: &str,
    owner: &str,
    until_ms: i64,
) -> Result<(), StepError> {
    submitter
        .bus
        .modify(
            mutex_key,
            |mutex: &mut CreateMutex| -> Result<Cas<()>, StepError> {
                if mutex.owner != owner {
                    return Ok(Cas::Keep(()));
                }
                mutex.until_ms = until_ms;
                Ok(Cas::Write(()))
            },
        )
        .await
}

/// Testing only (the chaos run): die between creating a batch and recording it.
fn chaos_crash(submitter: &Submitter, key: &ShardKey, batch_id: &str) {
    if submitter.chaos_crash_after_create > 0.0
        && rand::random::<f64>() < submitter.chaos_crash_after_create
    {
        tracing::error!(job_id = %key.job_id, shard = key.shard, batch_id, "chaos: aborting between batch created and batch id recorded");
        std::process::abort();
    }
}
