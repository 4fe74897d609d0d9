//! `streamhelper owner show|evict`: the candidates campaigning on `/tidb/br-stream/owner`
//! (every tidb-server and every streamhelper advancer), and eviction of one of them.

use clap::{Args, Subcommand};
use serde::Serialize;

use super::ClusterArgs;
use streamhelper::etcd::{Candidate, Election};
use streamhelper::is_our_owner_id;
use streamhelper::meta::keys::OWNER_PREFIX;
use streamhelper::{Error, Result};

#[derive(Args, Debug)]
pub struct OwnerArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: OwnerAction,
}

#[derive(Subcommand, Debug)]
enum OwnerAction {
    /// Every candidate in campaign order: the first one is the owner.
    Show,
    /// Delete a candidate's key (ours or a TiDB's). A TiDB server campaigns again at the back
    /// of the queue; a streamhelper advancer does too. Default: the current owner.
    Evict {
        /// The candidate's key, lease id (hex) or id (the key's value).
        candidate: Option<String>,
    },
}

#[derive(Serialize)]
struct CandidateRow {
    key: String,
    lease: String,
    /// Seconds left on the lease; `None` if it is gone or the key has none.
    ttl: Option<i64>,
    id: String,
    owner: bool,
    /// Written by a streamhelper advancer (its ids end in the `shelpr` node marker).
    ours: bool,
}

fn rows(election: &Election, candidates: &[Candidate]) -> Result<Vec<CandidateRow>> {
    let etcd = election.client();
    candidates
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let ttl = if c.lease == 0 { None } else { etcd.lease_time_to_live(c.lease)? };
            Ok(CandidateRow {
                key: String::from_utf8_lossy(&c.key).into_owned(),
                lease: format!("{:x}", c.lease),
                ttl,
                id: String::from_utf8_lossy(&c.value).into_owned(),
                owner: i == 0,
                ours: is_our_owner_id(&c.value),
            })
        })
        .collect()
}

/// The candidate a user named by key, lease id (hex) or value.
fn find<'c>(candidates: &'c [Candidate], name: &str) -> Result<&'c Candidate> {
    let matches = |c: &&Candidate| {
        c.key == name.as_bytes() || format!("{:x}", c.lease) == name.to_ascii_lowercase() || c.value == name.as_bytes()
    };
    candidates.iter().find(matches).ok_or_else(|| {
        Error::Config(format!(
            "no owner candidate {name:?} under {OWNER_PREFIX}/ (`streamhelper owner show` lists them)"
        ))
    })
}

pub fn run(args: OwnerArgs) -> Result<()> {
    let election = Election::new(args.cluster.etcd_client()?, OWNER_PREFIX);
    let candidates = election.candidates()?;
    match args.action {
        OwnerAction::Show => {
            let rows = rows(&election, &candidates)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows).expect("JSON output"));
            } else if rows.is_empty() {
                println!("no owner candidate under {OWNER_PREFIX}/: no advancer is running");
            } else {
                let cells: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            if r.owner { "owner" } else { "standby" }.to_string(),
                            r.key.clone(),
                            r.lease.clone(),
                            r.ttl.map_or("-".into(), |t| format!("{t}s")),
                            r.id.clone(),
                            if r.ours { "streamhelper" } else { "tidb (or other)" }.to_string(),
                        ]
                    })
                    .collect();
                super::task::print_table(&["ROLE", "KEY", "LEASE", "TTL", "ID", "KIND"], &cells);
            }
        }
        OwnerAction::Evict { candidate } => {
            let target = match &candidate {
                Some(name) => find(&candidates, name)?,
                None => candidates
                    .first()
                    .ok_or_else(|| Error::Config(format!("no owner candidate under {OWNER_PREFIX}/ to evict")))?,
            };
            let role = if target.create_revision == candidates[0].create_revision { "owner" } else { "candidate" };
            let key = String::from_utf8_lossy(&target.key);
            let id = String::from_utf8_lossy(&target.value);
            if !election.evict(target)? {
                return Err(Error::Config(format!("{key} changed or went away meanwhile; nothing evicted")));
            }
            println!(
                "evicted {role} {key} (id {id}, lease {:x}); it campaigns again at the back of the queue",
                target.lease
            );
        }
    }
    Ok(())
}
