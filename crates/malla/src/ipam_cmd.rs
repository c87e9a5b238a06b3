//! `malla ipam show`: pools, and blocks with their node and use.

use clap::Subcommand;
use serde::Serialize;

use crate::output::{Output, Table};

#[derive(Subcommand)]
pub enum IpamCommand {
    /// Print pools and blocks with their node affinity and use.
    ///
    /// Example: malla ipam show --lab demo -o yaml
    Show {
        /// Output format: table, wide, json or yaml.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

/// `ipam show -o json|yaml`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IpamView {
    pools: Vec<malla_api::IpPool>,
    blocks: Vec<BlockView>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BlockView {
    cidr: String,
    pool: String,
    node: Option<String>,
    used: u64,
    capacity: u64,
}

pub fn run(g: &crate::Globals, cmd: IpamCommand) -> anyhow::Result<()> {
    match cmd {
        IpamCommand::Show { output } => {
            let store = g.open_store()?;
            let ipam = malla_ipam::Ipam::new(&*store);
            let pools = ipam.pools()?;
            let blocks = ipam.blocks()?;
            let view = IpamView {
                pools,
                blocks: blocks
                    .iter()
                    .map(|b| BlockView {
                        cidr: b.cidr.to_string(),
                        pool: b.pool.clone(),
                        node: b.affinity.clone(),
                        used: b.used(),
                        capacity: b.capacity(),
                    })
                    .collect(),
            };
            if output.document(&view)? {
                return Ok(());
            }
            let mut t = Table::new(&["POOL", "CIDR", "BLOCK", "NAT", "DISABLED"]);
            for p in &view.pools {
                t.row(vec![
                    p.name.clone(),
                    p.cidr.to_string(),
                    format!("/{}", p.block_size),
                    if p.nat_outgoing { "yes" } else { "no" }.into(),
                    if p.disabled { "yes" } else { "no" }.into(),
                ]);
            }
            t.print();
            println!();
            let mut t = Table::new(&["BLOCK", "POOL", "NODE", "USED"]).right(3);
            for b in &view.blocks {
                t.row(vec![
                    b.cidr.clone(),
                    b.pool.clone(),
                    b.node.clone().unwrap_or_else(|| "-".into()),
                    format!("{}/{}", b.used, b.capacity),
                ]);
            }
            t.print();
            Ok(())
        }
    }
}
