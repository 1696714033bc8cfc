//! User ids: they name a directory on the host, so they are validated.

use std::fmt;

/// A validated user id: 1 to 64 characters of `[A-Za-z0-9._-]`, not `.` or
/// `..`. It is used as a path component (`<data-dir>/users/<id>`), so nothing
/// that could walk out of that directory gets through.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct UserId(String);

/// Why a string is not a user id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid user id {id:?}: {reason}")]
pub struct InvalidUserId {
    pub id: String,
    pub reason: &'static str,
}

const MAX_LEN: usize = 64;

impl UserId {
    /// Validates `id`.
    ///
    /// # Errors
    ///
    /// [`InvalidUserId`] saying what is wrong: empty, too long, `.`/`..`, or a
    /// character outside `[A-Za-z0-9._-]` (which rules out `/`, NUL and spaces).
    pub fn new(id: &str) -> Result<Self, InvalidUserId> {
        let invalid = |reason| InvalidUserId { id: id.to_owned(), reason };
        if id.is_empty() {
            return Err(invalid("it is empty"));
        }
        if id.len() > MAX_LEN {
            return Err(invalid("it is longer than 64 characters"));
        }
        if id == "." || id == ".." {
            return Err(invalid("`.` and `..` are not names"));
        }
        if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            return Err(invalid("only letters, digits, `.`, `_` and `-` are allowed"));
        }
        Ok(Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for UserId {
    type Err = InvalidUserId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_ids_are_accepted() {
        for id in ["alice", "local", "user-42", "a.b_c", "X"] {
            assert_eq!(UserId::new(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn ids_that_could_leave_the_users_directory_are_refused() {
        for id in ["", ".", "..", "../bob", "a/b", "/etc", "a\0b", "a b", "é", &"x".repeat(65)] {
            assert!(UserId::new(id).is_err(), "{id:?} was accepted");
        }
    }
}
