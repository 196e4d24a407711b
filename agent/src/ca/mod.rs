//! Node CA: name-constrained, per-SNI leaf certificates, trust-store install.
