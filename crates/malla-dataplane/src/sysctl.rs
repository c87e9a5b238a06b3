//! Reads and writes `/proc/sys`. Network sysctls belong to the namespace of the thread that
//! opens the file, so call these from inside the namespace (see [`crate::netns::NetNs::run`]).

use std::io;

/// Writes `value` to `/proc/sys/<key with dots as slashes>`, skipping the write when it
/// already holds that value.
pub fn set(key: &str, value: &str) -> io::Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}

/// Sets a per-interface sysctl; interface names may contain dots, so the path is built directly.
pub fn set_interface(family: &str, ifname: &str, leaf: &str, value: &str) -> io::Result<()> {
    let path = format!("/proc/sys/net/{family}/conf/{ifname}/{leaf}");
    std::fs::write(&path, value).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}
