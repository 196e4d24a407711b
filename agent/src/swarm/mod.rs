pub mod peer;
pub mod rate;
