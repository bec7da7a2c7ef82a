//! capsid's end-to-end tests, in one binary so that `make test` boots the
//! nested test host once for all of them.

mod agent;
mod boot;
mod cli;
mod containerd;
mod cri;
mod faults;
mod network;
mod security;
mod vmm;
