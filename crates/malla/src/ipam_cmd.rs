//! `malla ipam show`: pools, and blocks with their node and use.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum IpamCommand {
    /// Print pools and blocks with their node affinity and use.
    ///
    /// Example: malla ipam show --lab demo
    Show {
        #[command(flatten)]
        store: crate::lab_cmd::StoreArgs,
        /// Output format: table or json.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
}

pub fn run(cmd: IpamCommand) -> anyhow::Result<()> {
    match cmd {
        IpamCommand::Show { store, output } => {
            let store = store.open()?;
            let ipam = malla_ipam::Ipam::new(&*store);
            let pools = ipam.pools()?;
            let blocks = ipam.blocks()?;
            if output == "json" {
                let v = serde_json::json!({
                    "pools": pools,
                    "blocks": blocks.iter().map(|b| serde_json::json!({
                        "cidr": b.cidr.to_string(),
                        "pool": b.pool,
                        "node": b.affinity,
                        "used": b.used(),
                        "capacity": b.capacity(),
                    })).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!("{:<16} {:<24} {:>6} {:>6}", "POOL", "CIDR", "BLOCK", "NAT");
            for p in &pools {
                println!(
                    "{:<16} {:<24} {:>6} {:>6}{}",
                    p.name,
                    p.cidr.to_string(),
                    format!("/{}", p.block_size),
                    if p.nat_outgoing { "yes" } else { "no" },
                    if p.disabled { "  (disabled)" } else { "" }
                );
            }
            println!();
            println!(
                "{:<28} {:<16} {:<12} {:>10}",
                "BLOCK", "POOL", "NODE", "USED"
            );
            for b in &blocks {
                println!(
                    "{:<28} {:<16} {:<12} {:>10}",
                    b.cidr.to_string(),
                    b.pool,
                    b.affinity.as_deref().unwrap_or("-"),
                    format!("{}/{}", b.used(), b.capacity())
                );
            }
            Ok(())
        }
    }
}
