//! `bastide store migrate --to postgres`: a one-shot copy of the SQLite registry into an empty
//! PostgreSQL database, made with the bastion stopped. Every table of the SQLite file must be
//! one the copy knows: a table it would leave behind is refused, not dropped.

use std::time::Duration;

use super::{Backend, Dump, PgSettings, PgStore, Result, SqliteStore, StoreError};

/// The SQLite tables the copy knows (`meta` holds only SQLite's schema version). The SSH
/// user certificates of `ssh_certs` are carried over with their revocations, so that a
/// certificate issued before the move stays valid, and a revoked one refused, after it.
const KNOWN_TABLES: &[&str] = &["agents", "certs", "meta", "ssh_certs", "tokens"];

/// What was copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub tokens: usize,
    pub agents: usize,
    pub certs: usize,
    pub ssh_certs: usize,
}

/// Copies every row of the SQLite store at `from` into the PostgreSQL database of `to`, in
/// one transaction; refuses a target that already holds a token, an agent or a certificate.
pub fn sqlite_to_postgres(from: &std::path::Path, to: &PgSettings) -> Result<Copied> {
    let mut src = SqliteStore::open(from)?;
    let unknown: Vec<String> = src
        .table_names()?
        .into_iter()
        .filter(|t| !KNOWN_TABLES.contains(&t.as_str()))
        .collect();
    if !unknown.is_empty() {
        return Err(StoreError::Open {
            path: from.display().to_string(),
            message: format!(
                "holds tables this bastide cannot copy ({}): use the bastide that wrote it",
                unknown.join(", ")
            ),
        });
    }
    let dump: Dump = src.dump()?;
    // The copy is one transaction: give it more time than one registry operation.
    let mut settings = to.clone();
    settings.timeout = settings.timeout.max(Duration::from_secs(600));
    let mut dst = PgStore::connect(&settings)?;
    if !dst.is_empty()? {
        return Err(StoreError::Open {
            path: dst.describe(),
            message: "the target already holds a registry (tokens, agents or certificates): refusing to merge into it".into(),
        });
    }
    let theirs = dst.identities()?;
    for (k, v) in &dump.identity {
        if let Some(t) = theirs.get(k).filter(|t| *t != v) {
            return Err(StoreError::Open {
                path: dst.describe(),
                message: format!("the target belongs to another project identity ({k} {t}, this registry's is {v})"),
            });
        }
    }
    // A node that started on the target before the copy recorded the same identity.
    let mut to_import = dump.clone();
    to_import.identity.retain(|k, _| !theirs.contains_key(k));
    dst.import(&to_import)?;
    let mut back = dst.dump()?;
    let mut dump = dump;
    canon(&mut dump);
    canon(&mut back);
    if back != dump {
        return Err(StoreError::Corrupt(format!(
            "copy check: read back {} tokens, {} agents, {} certificates, {} SSH certificates that differ from the {}, {}, {}, {} written",
            back.tokens.len(),
            back.agents.len(),
            back.certs.len(),
            back.ssh_certs.len(),
            dump.tokens.len(),
            dump.agents.len(),
            dump.certs.len(),
            dump.ssh_certs.len()
        )));
    }
    Ok(Copied {
        tokens: dump.tokens.len(),
        agents: dump.agents.len(),
        certs: dump.certs.len(),
        ssh_certs: dump.ssh_certs.len(),
    })
}

fn canon(d: &mut Dump) {
    // BTreeMap: already in order.
    d.tokens.sort_by(|a, b| a.id.cmp(&b.id));
    d.agents.sort_by(|a, b| a.name.cmp(&b.name));
    d.certs.sort_by(|a, b| a.serial.cmp(&b.serial));
    d.ssh_certs.sort_by_key(|c| c.serial);
}
