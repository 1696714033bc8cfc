//! Users and their API keys. A key is shown once, when it is made; only its
//! SHA-256 is stored.

use rusqlite::params;
use sha2::{Digest, Sha256};

use super::{Store, StoreError, Writer, optional};
use crate::audit::{AuditEvent, Kind};
use crate::policy::UserId;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user: UserId,
    pub tier: String,
    pub admin: bool,
}

/// A user as listed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UserRow {
    pub id: String,
    pub tier: String,
    pub admin: bool,
    pub created_at: String,
    pub active_keys: u32,
}

/// A freshly made key: the only time the secret exists outside its owner.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub user: String,
    pub key: String,
}

const KEY_PREFIX: &str = "ixs_";

/// A new random key: 32 bytes from the OS, hex.
fn generate_key() -> Result<String, StoreError> {
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

impl Store {
    /// Adds a user with one key.
    ///
    /// # Errors
    ///
    /// [`StoreError::Conflict`] when the user exists.
    pub async fn add_user(&self, user: UserId, tier: String, admin: bool, actor: String) -> Result<NewKey, StoreError> {
        self.write(move |w| add_user(w, &user, &tier, admin, &actor)).await
    }

    /// Makes another key for an existing user.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for an unknown user.
    pub async fn issue_key(&self, user: UserId, actor: String) -> Result<NewKey, StoreError> {
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

    /// Moves a user to another tier.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for an unknown user.
    pub async fn set_tier(&self, user: UserId, tier: String, actor: String) -> Result<(), StoreError> {
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

    /// Revokes every key of a user; answers how many were active.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for an unknown user.
    pub async fn revoke_keys(&self, user: UserId, actor: String) -> Result<usize, StoreError> {
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

    /// Every user, by id.
    ///
    /// # Errors
    ///
    /// A database error.
    pub fn list_users(&self) -> Result<Vec<UserRow>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT u.id, u.tier, u.admin, u.created_at,
                        (SELECT count(*) FROM api_keys k WHERE k.user_id = u.id AND k.revoked_at IS NULL)
                 FROM users u ORDER BY u.id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(UserRow {
                    id: r.get(0)?,
                    tier: r.get(1)?,
                    admin: r.get(2)?,
                    created_at: r.get(3)?,
                    active_keys: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// The caller a key belongs to, or `None` for an unknown or revoked key.
    ///
    /// # Errors
    ///
    /// A database error.
    pub fn authenticate(&self, key: &str) -> Result<Option<Caller>, StoreError> {
        let hash = key_hash(key);
        self.read(|conn| {
            let row = optional(
                conn.prepare_cached(
                    "SELECT u.id, u.tier, u.admin FROM api_keys k JOIN users u ON u.id = k.user_id
                     WHERE k.hash = ?1 AND k.revoked_at IS NULL",
                )?
                .query_row([&hash], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, bool>(2)?))),
            )?;
            Ok(row.and_then(|(id, tier, admin)| Some(Caller { user: UserId::new(&id).ok()?, tier, admin })))
        })
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
