//! Launching kt-fleet on one machine, the one way `ktctl dev up`, `ktctl demo`, the end-to-end
//! tests and `kt-bench` all do it: [`pki`] issues the deployment's certificates, [`configs`]
//! writes each daemon's config file by serialising that daemon's own config type, and
//! [`process`] starts daemons, waits for their ready files and stops them by their own pid.

pub mod configs;
pub mod etcd;
pub mod nats;
pub mod pki;
pub mod process;
