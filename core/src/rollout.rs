//! Numbers the testbed bench (`dfly-bench`) and the simulator
//! (`damselfly-sim`) must agree on, so a simulated run and a measured one
//! describe the same setting: sizes and rates as their flags take them, how an
//! image is cut into layers, and the lower bound T* on a rollout.

/// `300MiB`, `1GiB`, `20MB`, `4096` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000 * 1000,
        "g" | "gb" => 1000 * 1000 * 1000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "unknown unit in {s:?} (use B, kB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    Ok((num * mult as f64) as u64)
}

/// `100mbit`, `1gbit`, `100` (Mbit/s), in Mbit/s as `tc` takes it.
pub fn parse_rate(s: &str) -> Result<u32, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = if let Some(n) = t.strip_suffix("gbit") {
        (n, 1000)
    } else {
        (t.strip_suffix("mbit").unwrap_or(&t), 1)
    };
    match num.trim().parse::<u32>() {
        Ok(v) if v > 0 => Ok(v * mult),
        _ => Err(format!("not a rate: {s:?} (e.g. 100mbit, 1gbit)")),
    }
}

/// An image of `total` bytes in `layers` equal layers, the last one taking
/// the remainder.
pub fn layer_sizes(total: u64, layers: u64) -> Vec<u64> {
    let each = total / layers;
    let mut sizes = vec![each; layers as usize];
    *sizes.last_mut().expect("at least one layer") += total - each * layers;
    sizes
}

/// The fastest any scheme could deliver `bytes` to each of `n` nodes: the
/// origin must send it once, each node must receive it, and all copies
/// together must enter the nodes through the origin's and the nodes' uplinks.
pub fn t_star(bytes: u64, origin_mbit: u32, node_mbit: u32, n: usize) -> f64 {
    let bits = bytes as f64 * 8.0;
    let (o, r) = (f64::from(origin_mbit) * 1e6, f64::from(node_mbit) * 1e6);
    let n = n as f64;
    (bits / o).max(bits / r).max(n * bits / (o + n * r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_star_is_the_tightest_of_the_three_bounds() {
        const MIB200: u64 = 200 << 20;
        // One node: its own or the origin's link, whichever is slower.
        let one = t_star(MIB200, 50, 250, 1);
        assert!((one - MIB200 as f64 * 8.0 / 50e6).abs() < 1e-9);
        // A fast origin: each node's own link. (With the same rate up and
        // down, the aggregate N·S/(O + N·R) never exceeds S/R.)
        let many = t_star(MIB200, 1000, 10, 8);
        assert!((many - MIB200 as f64 * 8.0 / 10e6).abs() < 1e-9);
        assert!(t_star(MIB200, 50, 250, 8) >= one);
    }

    #[test]
    fn sizes_and_rates_parse() {
        assert_eq!(parse_size("200MiB"), Ok(200 << 20));
        assert_eq!(parse_size("20mb"), Ok(20_000_000));
        assert!(parse_size("3 parsecs").is_err());
        assert_eq!(parse_rate("50mbit"), Ok(50));
        assert_eq!(parse_rate("1gbit"), Ok(1000));
        assert!(parse_rate("0").is_err());
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_rate("250"), Ok(250));
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn layers_add_up_to_the_image() {
        assert_eq!(layer_sizes(10, 3), vec![3, 3, 4]);
        assert_eq!(layer_sizes(48 << 20, 4).iter().sum::<u64>(), 48 << 20);
    }
}
