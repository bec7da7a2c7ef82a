//! The agent's settings, from the kernel command line (`capsid.port=1024
//! capsid.log=debug`), so the initramfs needs no configuration file.

use capsid_protocol::DEFAULT_AGENT_PORT;

/// The agent's settings, from the kernel command line (`cocoon.port=…`, `cocoon.log=…`): the image needs no config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// The vsock port the agent listens on.
    pub port: u32,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub log_level: tracing::Level,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            port: DEFAULT_AGENT_PORT,
            log_level: tracing::Level::INFO,
        }
    }
}

impl AgentConfig {
    /// Reads `capsid.*` words; other words are the kernel's. A bad value is
    /// reported and the default kept: the agent must come up to be told
    /// anything at all.
    pub fn from_cmdline(cmdline: &str) -> (Self, Vec<String>) {
        let mut config = Self::default();
        let mut problems = Vec::new();
        for word in cmdline.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "capsid.port" => match value.parse() {
                    Ok(port) if port > 0 => config.port = port,
                    _ => problems.push(format!("capsid.port={value:?} is not a port number")),
                },
                "capsid.log" => match value.parse() {
                    Ok(level) => config.log_level = level,
                    Err(_) => problems.push(format!(
                        "capsid.log={value:?} is not one of error, warn, info, debug, trace"
                    )),
                },
                key if key.starts_with("capsid.") => {
                    problems.push(format!("unknown setting {key} (ignored)"));
                }
                _ => {}
            }
        }
        (config, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_words_and_ignores_the_kernels() {
        let (config, problems) =
            AgentConfig::from_cmdline("console=ttyS0 capsid.port=2000 quiet capsid.log=debug\n");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(config.port, 2000);
        assert_eq!(config.log_level, tracing::Level::DEBUG);
    }

    #[test]
    fn bad_values_keep_the_default_and_are_reported() {
        let (config, problems) =
            AgentConfig::from_cmdline("capsid.port=0 capsid.port=x capsid.log=loud capsid.what=1");
        assert_eq!(config, AgentConfig::default());
        assert_eq!(problems.len(), 4, "{problems:?}");
    }
}
