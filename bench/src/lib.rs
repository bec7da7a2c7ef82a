//! capsid's benchmark (`capsid-bench`, `capsid bench`, `make bench`):
//! what it measures is in the binary's scenarios; the report it prints
//! and renders is [`report`], which the soak uses for its percentiles too.

#![warn(missing_docs)]

pub mod report;
