//! Users and their API keys. A key is shown once, when it is made; only its
//! SHA-256 is stored.

use rusqlite::params;
use sha2::{Digest, Sha256};

use super::{Sqlite, StoreError, Writer, optional};
use crate::audit::{AuditEvent, Kind};
use crate::policy::UserId;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user: UserId,
    pub tier: String,
    pub admin: bool,
    /// Requests per second while a throttle holds (below the tier's rate).
    pub throttle: Option<u32>,
    /// The network the request came from (`crate::api::client`), for
    /// behaviour analysis; set by the API, `None` where it is not known.
    pub network: Option<String>,
}

/// A key whose user is suspended: refused with why and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspended {
    pub user: UserId,
    /// Unix seconds.
    pub until: i64,
    pub reason: String,
}

/// What a presented key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheck {
    Active(Caller),
    Suspended(Suspended),
    /// Unknown, or revoked (then naming its user).
    Refused(Option<String>),
}

impl KeyCheck {
    /// What a key found in the database says: its user `id`, their `tier`
    /// and role, whether the key was revoked, the suspension that holds
    /// (until, why) and the throttle's rate, if any.
    pub(super) fn of_key(
        id: String,
        tier: String,
        admin: bool,
        revoked: bool,
        suspended: Option<(i64, String)>,
        throttle: Option<u32>,
    ) -> KeyCheck {
        let Ok(user) = UserId::new(&id) else { return KeyCheck::Refused(None) };
        match (revoked, suspended) {
            (true, _) => KeyCheck::Refused(Some(id)),
            (false, Some((until, reason))) => KeyCheck::Suspended(Suspended { user, until, reason }),
            (false, None) => KeyCheck::Active(Caller { user, tier, admin, throttle, network: None }),
        }
    }
}

/// What is put on a user for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restriction {
    Suspend,
    /// At most this many requests per second.
    Throttle(u32),
}

impl Restriction {
    pub fn kind(self) -> &'static str {
        match self {
            Restriction::Suspend => "suspend",
            Restriction::Throttle(_) => "throttle",
        }
    }
}

/// A restriction as it holds after [`Store::restrict`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restricted {
    /// Unix seconds.
    pub until: i64,
    pub reason: String,
    /// A throttle's requests per second.
    pub rate: Option<u32>,
    /// A longer one already held, and stays (not the one asked for).
    pub kept_longer: bool,
}

/// Now, in Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Unix seconds as RFC 3339.
pub fn unix_rfc3339(secs: i64) -> String {
    crate::report::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64))
}

/// A user as listed.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct UserRow {
    pub id: String,
    pub tier: String,
    pub admin: bool,
    pub created_at: String,
    pub active_keys: u32,
    /// RFC 3339, while a suspension holds.
    pub suspended_until: Option<String>,
    /// RFC 3339, while a throttle holds.
    pub throttled_until: Option<String>,
}

/// A freshly made key: the only time the secret exists outside its owner.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub user: String,
    pub key: String,
}

pub(super) const KEY_PREFIX: &str = "ixs_";

/// A new random key: 32 bytes from the OS, hex.
pub(super) fn generate_key() -> Result<String, StoreError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Conflict(format!("no randomness for a key: {e}")))?;
    Ok(format!("{KEY_PREFIX}{}", hex::encode(bytes)))
}

/// The stored form of a key.
pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn insert_key(w: &Writer<'_>, user: &str) -> Result<NewKey, StoreError> {
    let key = generate_key()?;
    w.conn().execute(
        "INSERT INTO api_keys (hash, user_id, prefix, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![key_hash(&key), user, &key[..KEY_PREFIX.len() + 8], w.now()],
    )?;
    Ok(NewKey { user: user.to_owned(), key })
}

fn user_exists(w: &Writer<'_>, user: &str) -> Result<bool, StoreError> {
    Ok(optional(w.conn().query_row("SELECT 1 FROM users WHERE id = ?1", [user], |_| Ok(())))?.is_some())
}

impl Sqlite {
    /// SQLite: see [`Store::add_user`].
    pub(super) async fn add_user(
        &self,
        user: UserId,
        tier: String,
        admin: bool,
        actor: String,
    ) -> Result<NewKey, StoreError> {
        self.write(move |w| add_user(w, &user, &tier, admin, &actor)).await
    }

    /// SQLite: see [`Store::issue_key`].
    pub(super) async fn issue_key(&self, user: UserId, actor: String) -> Result<NewKey, StoreError> {
        self.write(move |w| {
            if !user_exists(w, user.as_str())? {
                return Err(StoreError::NotFound(format!("no user `{user}`")));
            }
            let key = insert_key(w, user.as_str())?;
            w.audit(&AuditEvent::new(Kind::KeyIssued, "ok").actor(actor).user(user.as_str()))?;
            Ok(key)
        })
        .await
    }

    /// SQLite: see [`Store::set_tier`].
    pub(super) async fn set_tier(&self, user: UserId, tier: String, actor: String) -> Result<(), StoreError> {
        self.write(move |w| {
            let old: Option<String> =
                optional(w.conn().query_row("SELECT tier FROM users WHERE id = ?1", [user.as_str()], |r| r.get(0)))?;
            let Some(old) = old else { return Err(StoreError::NotFound(format!("no user `{user}`"))) };
            w.conn().execute("UPDATE users SET tier = ?1 WHERE id = ?2", params![tier, user.as_str()])?;
            let detail = serde_json::json!({"from": old, "to": tier});
            w.audit(&AuditEvent::new(Kind::UserTierChanged, "ok").actor(actor).user(user.as_str()).detail(detail))
        })
        .await
    }

    /// SQLite: see [`Store::revoke_keys`].
    pub(super) async fn revoke_keys(&self, user: UserId, actor: String) -> Result<usize, StoreError> {
        self.write(move |w| {
            if !user_exists(w, user.as_str())? {
                return Err(StoreError::NotFound(format!("no user `{user}`")));
            }
            let n = w.conn().execute(
                "UPDATE api_keys SET revoked_at = ?1 WHERE user_id = ?2 AND revoked_at IS NULL",
                params![w.now(), user.as_str()],
            )?;
            let detail = serde_json::json!({"keys": n});
            w.audit(&AuditEvent::new(Kind::KeysRevoked, "ok").actor(actor).user(user.as_str()).detail(detail))?;
            Ok(n)
        })
        .await
    }

    /// SQLite: see [`Store::list_users`].
    pub(super) async fn list_users(&self) -> Result<Vec<UserRow>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT u.id, u.tier, u.admin, u.created_at,
                        (SELECT count(*) FROM api_keys k WHERE k.user_id = u.id AND k.revoked_at IS NULL),
                        (SELECT until FROM restrictions r WHERE r.user_id = u.id AND r.kind = 'suspend' AND r.until > ?1),
                        (SELECT until FROM restrictions r WHERE r.user_id = u.id AND r.kind = 'throttle' AND r.until > ?1)
                 FROM users u ORDER BY u.id",
            )?;
            let rows = stmt.query_map([unix_now()], |r| {
                Ok(UserRow {
                    id: r.get(0)?,
                    tier: r.get(1)?,
                    admin: r.get(2)?,
                    created_at: r.get(3)?,
                    active_keys: r.get(4)?,
                    suspended_until: r.get::<_, Option<i64>>(5)?.map(unix_rfc3339),
                    throttled_until: r.get::<_, Option<i64>>(6)?.map(unix_rfc3339),
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// SQLite: see [`Store::authenticate`].
    pub(super) async fn authenticate(&self, key: &str) -> Result<KeyCheck, StoreError> {
        let hash = key_hash(key);
        self.read(|conn| {
            let row = optional(
                conn.prepare_cached(
                    "SELECT u.id, u.tier, u.admin, k.revoked_at IS NOT NULL, s.until, s.reason, t.rate
                     FROM api_keys k JOIN users u ON u.id = k.user_id
                     LEFT JOIN restrictions s ON s.user_id = u.id AND s.kind = 'suspend' AND s.until > ?2
                     LEFT JOIN restrictions t ON t.user_id = u.id AND t.kind = 'throttle' AND t.until > ?2
                     WHERE k.hash = ?1",
                )?
                .query_row(params![&hash, unix_now()], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, bool>(2)?,
                        r.get::<_, bool>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, Option<u32>>(6)?,
                    ))
                }),
            )?;
            let Some((id, tier, admin, revoked, suspended, reason, throttle)) = row else {
                return Ok(KeyCheck::Refused(None));
            };
            Ok(KeyCheck::of_key(
                id,
                tier,
                admin,
                revoked,
                suspended.map(|until| (until, reason.unwrap_or_default())),
                throttle,
            ))
        })
    }

    /// SQLite: see [`Store::restrict`].
    pub(super) async fn restrict(
        &self,
        user: UserId,
        restriction: Restriction,
        until: i64,
        reason: String,
        actor: String,
    ) -> Result<Restricted, StoreError> {
        self.write(move |w| {
            let admin: Option<bool> =
                optional(w.conn().query_row("SELECT admin FROM users WHERE id = ?1", [user.as_str()], |r| r.get(0)))?;
            let Some(admin) = admin else { return Err(StoreError::NotFound(format!("no user `{user}`"))) };
            let now = unix_now();
            if admin && restriction == Restriction::Suspend {
                // Another admin who can sign in: an active key, not suspended.
                let others: u32 = w.conn().query_row(
                    "SELECT count(*) FROM users u WHERE u.admin AND u.id != ?1
                       AND EXISTS (SELECT 1 FROM api_keys k WHERE k.user_id = u.id AND k.revoked_at IS NULL)
                       AND NOT EXISTS
                       (SELECT 1 FROM restrictions r WHERE r.user_id = u.id AND r.kind = 'suspend' AND r.until > ?2)",
                    params![user.as_str(), now],
                    |r| r.get(0),
                )?;
                if others == 0 {
                    return Err(StoreError::Conflict(format!(
                        "`{user}` is the last admin who can sign in (an active key, not suspended): suspending them \
                         would leave nobody to lift it"
                    )));
                }
            }
            let rate = match restriction {
                Restriction::Throttle(rate) => Some(rate),
                Restriction::Suspend => None,
            };
            // One that holds longer is kept (a rule's 15 minutes never
            // shorten an admin's 30 days); an expired one is replaced.
            w.conn().execute(
                "INSERT INTO restrictions (user_id, kind, until, rate, reason, by, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (user_id, kind) DO UPDATE SET
                   until = excluded.until, rate = excluded.rate, reason = excluded.reason, by = excluded.by,
                   at = excluded.at
                 WHERE excluded.until >= restrictions.until",
                params![user.as_str(), restriction.kind(), until, rate, reason, actor, w.now()],
            )?;
            let kind = match restriction {
                Restriction::Suspend => Kind::UserSuspended,
                Restriction::Throttle(_) => Kind::UserThrottled,
            };
            let held: Restricted = w.conn().query_row(
                "SELECT until, reason, rate FROM restrictions WHERE user_id = ?1 AND kind = ?2",
                params![user.as_str(), restriction.kind()],
                |r| Ok(Restricted { until: r.get(0)?, reason: r.get(1)?, rate: r.get(2)?, kept_longer: false }),
            )?;
            let kept_longer = held.until > until;
            let mut detail = serde_json::json!({
                "until": unix_rfc3339(until),
                "for_s": until - now,
                "requests_per_second": rate,
                "reason": reason,
            });
            if kept_longer {
                // A longer one already held: it stays, and the record says so.
                detail["kept_longer"] = serde_json::json!({
                    "until": unix_rfc3339(held.until),
                    "requests_per_second": held.rate,
                    "reason": held.reason,
                });
            }
            w.audit(&AuditEvent::new(kind, "ok").actor(actor).user(user.as_str()).detail(detail))?;
            Ok(Restricted { kept_longer, ..held })
        })
        .await
    }

    /// SQLite: see [`Store::lift_restrictions`].
    pub(super) async fn lift_restrictions(&self, user: UserId, actor: String) -> Result<Vec<String>, StoreError> {
        self.write(move |w| {
            if !user_exists(w, user.as_str())? {
                return Err(StoreError::NotFound(format!("no user `{user}`")));
            }
            let held: Vec<String> = {
                let mut stmt = w
                    .conn()
                    .prepare("SELECT kind FROM restrictions WHERE user_id = ?1 AND until > ?2 ORDER BY kind")?;
                stmt.query_map(params![user.as_str(), unix_now()], |r| r.get(0))?.collect::<Result<_, _>>()?
            };
            w.conn().execute("DELETE FROM restrictions WHERE user_id = ?1", [user.as_str()])?;
            if !held.is_empty() {
                let detail = serde_json::json!({"lifted": held});
                w.audit(&AuditEvent::new(Kind::UserUnsuspended, "ok").actor(actor).user(user.as_str()).detail(detail))?;
            }
            Ok(held)
        })
        .await
    }
}

fn add_user(w: &mut Writer<'_>, user: &UserId, tier: &str, admin: bool, actor: &str) -> Result<NewKey, StoreError> {
    if user_exists(w, user.as_str())? {
        return Err(StoreError::Conflict(format!("user `{user}` already exists")));
    }
    w.conn().execute(
        "INSERT INTO users (id, tier, admin, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![user.as_str(), tier, admin, w.now()],
    )?;
    let key = insert_key(w, user.as_str())?;
    let detail = serde_json::json!({"tier": tier, "admin": admin});
    w.audit(&AuditEvent::new(Kind::UserAdded, "ok").actor(actor).user(user.as_str()).detail(detail))?;
    w.audit(&AuditEvent::new(Kind::KeyIssued, "ok").actor(actor).user(user.as_str()))?;
    Ok(key)
}
