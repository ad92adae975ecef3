//! Operators on SQLite: users, API tokens and dashboard sessions.

use async_trait::async_trait;
use sqlx::Row;

use super::rows::{user_from_row, user_record_from_row};
use super::{SqliteStore, Tx};
use crate::audit::AuditEntry;
use crate::rows::{USER_COLUMNS, USER_RECORD_COLUMNS};
use crate::sql::{is_unique_violation, q};
use crate::{ApiTokenRecord, Entity, FirstAdmin, Millis, Result, Role, StoreError, User, UserRecord, UserStore};

/// What counts as a user's session (docs/decisions.md): dashboard cookie
/// sessions and the API tokens created with the password (`tether login`
/// does that over HTTP Basic). Tokens created with another token stay.
async fn end_sessions(tx: &mut Tx, user_id: &str, now: Millis) -> Result<()> {
    sqlx::query("DELETE FROM sessions WHERE user_id = ?").bind(user_id).execute(&mut **tx).await?;
    sqlx::query("UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE user_id = ? AND from_password = 1")
        .bind(now)
        .bind(user_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn insert_user(tx: &mut Tx, username: &str, password_hash: &str, role: Role, now: Millis) -> Result<User> {
    let id = uuid::Uuid::now_v7().to_string();
    let res = sqlx::query("INSERT INTO users (id, username, password_hash, role, created_at) VALUES (?, ?, ?, ?, ?)")
        .bind(&id)
        .bind(username)
        .bind(password_hash)
        .bind(role.as_str())
        .bind(now)
        .execute(&mut **tx)
        .await;
    match res {
        Err(e) if is_unique_violation(&e) => return Err(StoreError::Conflict(format!("user {username:?} exists"))),
        other => other?,
    };
    Ok(User { id, username: username.to_owned(), role, password_hash: password_hash.to_owned() })
}

async fn insert_api_token(
    tx: &mut Tx,
    user_id: &str,
    name: &str,
    token_hash: [u8; 32],
    expires_at: Option<Millis>,
    from_password: bool,
    now: Millis,
) -> Result<String> {
    let id = uuid::Uuid::now_v7().to_string();
    sqlx::query(
        "INSERT INTO api_tokens (id, user_id, name, token_hash, created_at, expires_at, from_password)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&id)
    .bind(user_id)
    .bind(name)
    .bind(&token_hash[..])
    .bind(now)
    .bind(expires_at)
    .bind(from_password)
    .execute(&mut **tx)
    .await?;
    Ok(id)
}

#[async_trait]
impl UserStore for SqliteStore {
    async fn create_first_admin(&self, admin: FirstAdmin, audit: AuditEntry) -> Result<Option<User>> {
        let mut tx = self.begin().await?;
        let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(&mut *tx).await?;
        if users > 0 {
            return Ok(None);
        }
        let user = insert_user(&mut tx, &admin.username, &admin.password_hash, Role::Admin, admin.now).await?;
        // Handed out with the first password: a password reset ends it too.
        let token = "bootstrap";
        insert_api_token(&mut tx, &user.id, token, admin.token_hash, Some(admin.token_expires_at), true, admin.now)
            .await?;
        super::audit::insert_audit(&mut tx, &AuditEntry { target: user.id.clone(), ..audit }).await?;
        tx.commit().await?;
        Ok(Some(user))
    }

    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        role: Role,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<User> {
        let mut tx = self.begin().await?;
        let user = insert_user(&mut tx, username, password_hash, role, now).await?;
        super::audit::insert_audit(&mut tx, &AuditEntry { target: user.id.clone(), ..audit }).await?;
        tx.commit().await?;
        Ok(user)
    }

    async fn set_password(&self, username: &str, password_hash: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let id: Option<String> =
            sqlx::query_scalar("UPDATE users SET password_hash = ? WHERE username = ? RETURNING id")
                .bind(password_hash)
                .bind(username)
                .fetch_optional(&mut *tx)
                .await?;
        let id = id.ok_or(StoreError::NotFound(Entity::User))?;
        end_sessions(&mut tx, &id, now).await?;
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>> {
        let rows = q!("SELECT {USER_RECORD_COLUMNS} FROM users ORDER BY username").fetch_all(&self.reader).await?;
        rows.iter().map(user_record_from_row).collect()
    }

    async fn update_user(
        &self,
        id: &str,
        role: Option<Role>,
        password_hash: Option<&str>,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<UserRecord> {
        let mut tx = self.begin().await?;
        let row = q!("UPDATE users SET role = COALESCE(?, role), password_hash = COALESCE(?, password_hash)
             WHERE id = ? AND disabled_at IS NULL RETURNING {USER_RECORD_COLUMNS}")
        .bind(role.map(Role::as_str))
        .bind(password_hash)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound(Entity::User))?;
        if password_hash.is_some() {
            end_sessions(&mut tx, id, now).await?;
        }
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        user_record_from_row(&row)
    }

    async fn disable_user(&self, id: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("UPDATE users SET disabled_at = ? WHERE id = ? AND disabled_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(Entity::User));
        }
        sqlx::query("UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE user_id = ?")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM sessions WHERE user_id = ?").bind(id).execute(&mut *tx).await?;
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn find_user(&self, username: &str) -> Result<Option<User>> {
        let row = q!("SELECT {USER_COLUMNS} FROM users WHERE username = ? AND disabled_at IS NULL")
            .bind(username)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| user_from_row(&r)).transpose()
    }

    async fn create_api_token(
        &self,
        user_id: &str,
        name: &str,
        token_hash: [u8; 32],
        expires_at: Option<Millis>,
        from_password: bool,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<String> {
        let mut tx = self.begin().await?;
        let id = insert_api_token(&mut tx, user_id, name, token_hash, expires_at, from_password, now).await?;
        super::audit::insert_audit(&mut tx, &AuditEntry { target: id.clone(), ..audit }).await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn list_api_tokens(&self, user_id: &str) -> Result<Vec<ApiTokenRecord>> {
        let rows = sqlx::query(
            "SELECT id, name, created_at, expires_at, revoked_at FROM api_tokens WHERE user_id = ? ORDER BY id DESC",
        )
        .bind(user_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ApiTokenRecord {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    created_at: r.try_get(2)?,
                    expires_at: r.try_get(3)?,
                    revoked_at: r.try_get(4)?,
                })
            })
            .collect()
    }

    async fn revoke_api_token(&self, user_id: &str, id: &str, now: Millis, audit: AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let done =
            sqlx::query("UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ? AND user_id = ?")
                .bind(now)
                .bind(id)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(Entity::ApiToken));
        }
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_session(
        &self,
        token_hash: [u8; 32],
        user_id: &str,
        csrf: &str,
        expires_at: Millis,
        now: Millis,
        audit: AuditEntry,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM sessions WHERE expires_at <= ?").bind(now).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO sessions (token_hash, user_id, csrf, created_at, expires_at) VALUES (?, ?, ?, ?, ?)")
            .bind(&token_hash[..])
            .bind(user_id)
            .bind(csrf)
            .bind(now)
            .bind(expires_at)
            .execute(&mut *tx)
            .await?;
        super::audit::insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn find_session(&self, token_hash: [u8; 32], now: Millis) -> Result<Option<(User, String)>> {
        let row = sqlx::query(
            "SELECT u.id, u.username, u.role, u.password_hash, s.csrf FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.token_hash = ? AND s.expires_at > ? AND u.disabled_at IS NULL",
        )
        .bind(&token_hash[..])
        .bind(now)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| Ok((user_from_row(&r)?, r.try_get::<String, _>(4)?))).transpose()
    }

    async fn delete_session(&self, token_hash: [u8; 32]) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE token_hash = ?").bind(&token_hash[..]).execute(&self.writer).await?;
        Ok(())
    }

    async fn find_api_token(&self, token_hash: [u8; 32], now: Millis) -> Result<Option<(User, Option<Millis>)>> {
        let row = sqlx::query(
            "SELECT u.id, u.username, u.role, u.password_hash, t.expires_at FROM api_tokens t JOIN users u ON u.id = t.user_id
             WHERE t.token_hash = ? AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > ?)
               AND u.disabled_at IS NULL",
        )
        .bind(&token_hash[..])
        .bind(now)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| Ok((user_from_row(&r)?, r.try_get::<Option<Millis>, _>(4)?))).transpose()
    }
}
