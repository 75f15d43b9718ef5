//! The seed's rows that are few (tenants with their members, subscriptions, BYOK secrets and
//! channel bindings; pending commands; workflows with past runs; tokens), written one
//! `INSERT` at a time inside the seed's transaction; their values come from the same plan.

use anyhow::{Context, Result};
use chrono::Duration as ChronoDuration;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::json;
use sqlx::PgPool;

use super::generate::{Plan, TOPICS, capitalise, ts};
use super::{SeedReport, SeedTokens};
use crate::auth::{self, Scope};
use crate::store::audit;

impl Plan {
    pub(super) async fn insert_tenants(
        &self,
        tx: &mut sqlx::PgConnection,
        report: &mut SeedReport,
    ) -> Result<()> {
        let profile = self.profile;
        let mut rng = StdRng::seed_from_u64(self.config.rng_seed ^ 0x7e7a);
        for (t, tenant) in self.tenants.iter().enumerate() {
            sqlx::query(profile.sql("INSERT INTO {tenants} (id, slug, name, created_at) VALUES ($1, $2, $3, $4::timestamptz)"))
                .bind(&tenant.id)
                .bind(&tenant.slug)
                .bind(format!("Sim Tenant {t} ({:08x})", self.tag))
                .bind(ts(self.now - ChronoDuration::days(60)))
                .execute(&mut *tx)
                .await
                .with_context(|| {
                    format!(
                        "create tenant {}: was this database already seeded with --rng-seed {}? \
                         use another seed or a fresh database",
                        tenant.slug, self.config.rng_seed
                    )
                })?;
            report.tenants += 1;
            for (a, account) in tenant.accounts.iter().enumerate() {
                let role = ["owner", "admin", "member"][a % 3];
                sqlx::query(
                    profile.sql(
                        "INSERT INTO {accounts} (id, email, display_name) VALUES ($1, $2, $3)",
                    ),
                )
                .bind(account)
                .bind(format!("user{a}@{}.example", tenant.slug))
                .bind(format!("Sim User {a}"))
                .execute(&mut *tx)
                .await
                .context("create an account")?;
                sqlx::query(profile.sql(
                    "INSERT INTO {memberships} (tenant_id, account_id, role) VALUES ($1, $2, $3)",
                ))
                .bind(&tenant.id)
                .bind(account)
                .bind(role)
                .execute(&mut *tx)
                .await
                .context("create a membership")?;
                audit(
                    &mut *tx,
                    self.profile,
                    &tenant.id,
                    "seed",
                    "member.add",
                    account,
                )
                .await?;
                report.accounts += 1;
            }
            let plan = ["free", "team", "enterprise"][t % 3];
            sqlx::query(
                profile.sql("INSERT INTO {subscriptions} (id, tenant_id, plan, status, seats, current_period_end)
                 VALUES ($1, $2, $3, $4, $5, now() + interval '20 days')"),
            )
            .bind(format!("sub_{:08x}{t:016x}", self.tag))
            .bind(&tenant.id)
            .bind(plan)
            .bind(["active", "trialing", "past_due", "active"][t % 4])
            .bind(i32::try_from(3 + t % 20).unwrap_or(3))
            .execute(&mut *tx)
            .await
            .context("create a subscription")?;
            // BYOK: one provider key wrapped as opaque ciphertext, one held by a KMS. The
            // plaintext key exists only in this scope, to take its last four characters.
            for (k, provider) in ["openai", "anthropic"].iter().enumerate() {
                let key: String = (0..40)
                    .map(|_| char::from(rng.sample(rand::distr::Alphanumeric)))
                    .collect();
                let last4: String = key.chars().skip(36).collect();
                let (ciphertext, kms_ref) = if k == 0 {
                    let mut sealed = b"cwsim-envelope-v1:".to_vec();
                    let mut random = [0u8; 48];
                    rng.fill(&mut random);
                    sealed.extend_from_slice(&random);
                    (Some(sealed), None)
                } else {
                    (
                        None,
                        Some(format!(
                            "kms://cowork-sim/keyrings/{}/cryptoKeys/byok-{provider}/versions/1",
                            tenant.slug
                        )),
                    )
                };
                let id = format!("byok_{:08x}{t:012x}{k:04x}", self.tag);
                sqlx::query(
                    profile.sql("INSERT INTO {byok_secrets} (id, tenant_id, provider, ciphertext, kms_ref, last4)
                     VALUES ($1, $2, $3, $4, $5, $6)"),
                )
                .bind(&id)
                .bind(&tenant.id)
                .bind(*provider)
                .bind(ciphertext)
                .bind(kms_ref)
                .bind(last4)
                .execute(&mut *tx)
                .await
                .context("create a BYOK secret")?;
                audit(
                    &mut *tx,
                    self.profile,
                    &tenant.id,
                    "seed",
                    "byok.create",
                    &id,
                )
                .await?;
            }
            for (b, binding) in tenant.bindings.iter().enumerate() {
                let (channel, target) = if b == 0 {
                    ("slack", format!("#{}-updates", tenant.slug))
                } else {
                    (
                        "webhook",
                        format!("https://hooks.{}.example/cowork", tenant.slug),
                    )
                };
                sqlx::query(profile.sql(
                    "INSERT INTO {channel_bindings} (id, tenant_id, channel, target, status)
                     VALUES ($1, $2, $3, $4, 'active')",
                ))
                .bind(binding)
                .bind(&tenant.id)
                .bind(channel)
                .bind(target)
                .execute(&mut *tx)
                .await
                .context("create a channel binding")?;
                report.channel_bindings += 1;
            }
        }
        for w in 1..=2 {
            sqlx::query(profile.sql(
                "INSERT INTO {worker_heartbeats} (worker_id, hostname, pid, status,
                                                commands_processed, started_at, last_seen_at)
                 VALUES ($1, 'seed-host', $2, 'stopped', $3, now() - interval '2 days',
                         now() - interval '1 day')
                 ON CONFLICT (worker_id) DO NOTHING",
            ))
            .bind(format!("worker-seed-{w}"))
            .bind(1000 + w)
            .bind(i64::from(w) * 100)
            .execute(&mut *tx)
            .await
            .context("record seed worker heartbeats")?;
        }
        Ok(())
    }

    pub(super) async fn insert_pending_commands(&self, tx: &mut sqlx::PgConnection) -> Result<()> {
        let profile = self.profile;
        let idle: Vec<u64> = (0..self.config.sessions)
            .filter(|idx| idx % 10 <= 5)
            .take(usize::try_from(self.config.pending_commands).unwrap_or(usize::MAX))
            .collect();
        for (n, idx) in idle.iter().enumerate() {
            sqlx::query(profile.sql(
                "INSERT INTO {session_commands} (id, session_id, kind, payload, status)
                 VALUES ($1, $2, 'prompt', $3, 'pending')",
            ))
            .bind(format!("cmd_{:08x}{idx:012x}ffff", self.tag))
            .bind(self.session_id(*idx))
            .bind(json!({ "text": format!("Follow up on the last answer, please (#{n})") }))
            .execute(&mut *tx)
            .await
            .context("queue a pending command")?;
        }
        Ok(())
    }

    pub(super) async fn insert_workflows(
        &self,
        tx: &mut sqlx::PgConnection,
        report: &mut SeedReport,
    ) -> Result<()> {
        let profile = self.profile;
        const SCHEDULES: [i64; 4] = [60, 300, 3600, 86_400];
        let now_ms = self.now.timestamp_millis();
        for w in 0..self.config.workflows {
            let tenant = self.tenant(u64::from(w));
            let id = format!("wf_{:08x}{w:016x}", self.tag);
            let schedule = SCHEDULES[(w % 4) as usize];
            let status = match w % 6 {
                0..=2 => "active",
                3 => "paused",
                4 => "running",
                _ => "failed",
            };
            let next_ms = now_ms + (i64::from(w) * 37 % 600 + 60) * 1000;
            sqlx::query(profile.sql(
                "INSERT INTO {workflows} (id, tenant_id, name, prompt, schedule_seconds, status,
                                        next_run_at, last_run_at)
                 VALUES ($1, $2, $3, $4, $5, $6, to_timestamp($7::float8 / 1000),
                         to_timestamp($8::float8 / 1000))",
            ))
            .bind(&id)
            .bind(&tenant.id)
            .bind(format!(
                "{} digest {w}",
                capitalise(TOPICS[(w % 8) as usize])
            ))
            .bind(format!(
                "Summarise what changed in the {}",
                TOPICS[(w % 8) as usize]
            ))
            .bind(i32::try_from(schedule).unwrap_or(60))
            .bind(status)
            .bind(next_ms)
            .bind(next_ms - schedule * 1000)
            .execute(&mut *tx)
            .await
            .context("create a workflow")?;
            report.workflows += 1;
            for past in 1..=3i64 {
                let due_ms = next_ms - past * schedule * 1000;
                sqlx::query(profile.sql(
                    "INSERT INTO {workflow_runs} (id, workflow_id, due_at, idempotency_key,
                                                claimed_by, status)
                     VALUES ($1, $2, to_timestamp($3::float8 / 1000), $4, 'scheduler-seed', $5)",
                ))
                .bind(format!("run_{:08x}{w:012x}{past:04x}", self.tag))
                .bind(&id)
                .bind(due_ms)
                .bind(format!("{id}@{due_ms}"))
                .bind(if past == 2 && w % 5 == 0 {
                    "failed"
                } else {
                    "succeeded"
                })
                .execute(&mut *tx)
                .await
                .context("record a past workflow run")?;
                report.workflow_runs += 1;
            }
        }
        Ok(())
    }

    pub(super) async fn issue_tokens(&self, pool: &PgPool) -> Result<SeedTokens> {
        let operator = auth::issue_token(
            pool,
            self.profile,
            Scope::Operator,
            None,
            None,
            "seed operator",
        )
        .await?;
        let gateway = auth::issue_token(
            pool,
            self.profile,
            Scope::Gateway,
            None,
            None,
            "seed gateway",
        )
        .await?;
        let mut desktop = Vec::with_capacity(self.tenants.len());
        for tenant in &self.tenants {
            desktop.push(
                auth::issue_token(
                    pool,
                    self.profile,
                    Scope::Desktop,
                    Some(&tenant.id),
                    Some(&tenant.owner),
                    "seed desktop",
                )
                .await?,
            );
        }
        Ok(SeedTokens {
            operator,
            gateway,
            desktop,
        })
    }
}
