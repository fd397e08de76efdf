//! A private MariaDB server answers sqlx: create a table, insert a row, read it back.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use concentrator_e2e::mariadb::{self, MariaDb};
use concentrator_e2e::prereq;
use sqlx::Row;
use sqlx::mysql::MySqlPoolOptions;

#[tokio::test]
async fn create_insert_select() -> Result<()> {
    if prereq::require(&[mariadb::TOOLS]).is_skip() {
        return Ok(());
    }
    let t0 = Instant::now();
    let db = MariaDb::start()?;
    let t_start = t0.elapsed();

    let pool = MySqlPoolOptions::new()
        .max_connections(2)
        .connect(&db.url())
        .await
        .with_context(|| format!("connecting to {}\n{}", db.url(), db.log_tail(20)))?;
    sqlx::query(
        "CREATE TABLE sites (id BIGINT PRIMARY KEY AUTO_INCREMENT, name VARCHAR(64) NOT NULL, \
         psk VARBINARY(64) NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let inserted = sqlx::query("INSERT INTO sites (name, psk) VALUES (?, ?)")
        .bind("branch-1")
        .bind(&b"secret"[..])
        .execute(&pool)
        .await?;
    ensure!(inserted.rows_affected() == 1, "insert affected {inserted:?}");

    let row = sqlx::query("SELECT id, name, psk FROM sites WHERE name = ?")
        .bind("branch-1")
        .fetch_one(&pool)
        .await?;
    let id: i64 = row.try_get("id")?;
    let name: String = row.try_get("name")?;
    let psk: Vec<u8> = row.try_get("psk")?;
    ensure!(id == i64::try_from(inserted.last_insert_id())?, "id {id}");
    ensure!(
        name == "branch-1" && psk == b"secret",
        "read back {name:?} {psk:?}"
    );

    let user: String = sqlx::query_scalar("SELECT CURRENT_USER()")
        .fetch_one(&pool)
        .await?;
    ensure!(user.starts_with("e2e@"), "connected as {user}");
    pool.close().await;
    eprintln!(
        "timings: mariadb up {t_start:.2?}, test done {:.2?}",
        t0.elapsed()
    );
    Ok(())
}
