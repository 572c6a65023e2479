//! kvd: a key-value server speaking a Redis protocol subset, whose data lives
//! in an lmig region and which migrates itself live to another host.

pub mod admin;
pub mod check;
pub mod cli;
pub mod collections;
pub mod commands;
pub mod dry;
pub mod load;
pub mod migrate;
pub mod operator;
pub mod pace;
pub mod park;
pub mod resp;
pub mod security;
pub mod server;
pub mod stall;
pub mod store;
