//! The kernel's network counters, as the benchmarks read them.

/// `Tcp: <field>` of `/proc/net/snmp` in the calling thread's network
/// namespace (0 when it cannot be read).
pub fn snmp_tcp(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("Tcp:")).collect();
    if lines.len() < 2 {
        return 0;
    }
    let names: Vec<&str> = lines[0].split_whitespace().collect();
    let values: Vec<&str> = lines[1].split_whitespace().collect();
    names
        .iter()
        .position(|n| *n == field)
        .and_then(|i| values.get(i)?.parse().ok())
        .unwrap_or(0)
}
