//! Everything Malla does to nftables, in one place: the `nft -f` text path for the table's
//! chains and rules ([`cmd`]), element changes straight over nfnetlink ([`elements`]), the
//! change from one rendered table to the next as element changes ([`diff`]), a node's first
//! load in two transactions ([`cold_load`]), and the manager that owns the node's table and
//! decides which of these each apply takes ([`manager`]).
//!
//! The table itself (sets, maps, chains, rules) is rendered by the calculation
//! (`malla_calc::nft`, `malla_calc::services`); nothing here decides what it holds.

pub mod cmd;
pub mod cold_load;
pub mod diff;
pub mod elements;
pub mod manager;

pub use cmd::{apply, list_table, run, table_exists, NftError};
