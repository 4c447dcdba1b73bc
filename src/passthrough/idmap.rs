//! `--translate-uid` / `--translate-gid`: user and group ids translated by the daemon between
//! what the guest sees and uses and what the host stores, as virtiofsd does (no user
//! namespace needed).
//!
//! Guest to host applies to the ids a guest request makes files get: the caller's ids when it
//! creates a file, and the ids of a chown. Host to guest applies to every attribute reply.
//! Rules are tried in the order given; the first whose range holds the id decides, and an id
//! no rule holds stays as it is.

use std::io;

/// One `--translate-uid` / `--translate-gid` rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    /// `guest:<guest base>:<host base>:<count>`: guest ids to host ids, 1:1.
    Guest { guest: u32, host: u32, count: u32 },
    /// `host:<host base>:<guest base>:<count>`: host ids to guest ids, 1:1.
    Host { host: u32, guest: u32, count: u32 },
    /// `map:<guest base>:<host base>:<count>`: both ways, 1:1.
    Map { guest: u32, host: u32, count: u32 },
    /// `squash-guest:<guest base>:<host id>:<count>`: a range of guest ids to one host id.
    SquashGuest { guest: u32, host: u32, count: u32 },
    /// `squash-host:<host base>:<guest id>:<count>`: a range of host ids to one guest id.
    SquashHost { host: u32, guest: u32, count: u32 },
    /// `forbid-guest:<guest base>:<count>`: the guest may not give files these ids (EPERM).
    ForbidGuest { guest: u32, count: u32 },
}

fn within(id: u32, base: u32, count: u32) -> Option<u32> {
    let offset = id.checked_sub(base)?;
    (offset < count).then_some(offset)
}

/// The rules for one kind of id (uids or gids). Empty: no translation at all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdTranslation {
    rules: Vec<Rule>,
}

impl IdTranslation {
    /// Parse virtiofsd's rule strings (`--translate-uid` values, in order).
    pub fn parse(specs: &[String]) -> Result<Self, String> {
        let mut rules = Vec::with_capacity(specs.len());
        for spec in specs {
            rules.push(parse_rule(spec)?);
        }
        Ok(IdTranslation { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The host id for guest id `id`; EPERM where a `forbid-guest` rule holds it.
    pub fn to_host(&self, id: u32) -> io::Result<u32> {
        for rule in &self.rules {
            match *rule {
                Rule::Guest { guest, host, count } | Rule::Map { guest, host, count } => {
                    if let Some(off) = within(id, guest, count) {
                        return Ok(host + off);
                    }
                }
                Rule::SquashGuest { guest, host, count } => {
                    if within(id, guest, count).is_some() {
                        return Ok(host);
                    }
                }
                Rule::ForbidGuest { guest, count } => {
                    if within(id, guest, count).is_some() {
                        return Err(io::Error::from_raw_os_error(libc::EPERM));
                    }
                }
                Rule::Host { .. } | Rule::SquashHost { .. } => {}
            }
        }
        Ok(id)
    }

    /// The guest id for host id `id`.
    pub fn to_guest(&self, id: u32) -> u32 {
        for rule in &self.rules {
            match *rule {
                Rule::Host { host, guest, count } | Rule::Map { guest, host, count } => {
                    if let Some(off) = within(id, host, count) {
                        return guest + off;
                    }
                }
                Rule::SquashHost { host, guest, count } => {
                    if within(id, host, count).is_some() {
                        return guest;
                    }
                }
                Rule::Guest { .. } | Rule::SquashGuest { .. } | Rule::ForbidGuest { .. } => {}
            }
        }
        id
    }
}

fn parse_rule(spec: &str) -> Result<Rule, String> {
    let fields: Vec<&str> = spec.split(':').collect();
    let num = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("{spec:?}: {s:?} is not an id"))
    };
    let bad = || {
        format!(
            "{spec:?}: expected <type>:<source base>:<target base>:<count> (type guest, host, \
             map, squash-guest or squash-host) or forbid-guest:<base>:<count>"
        )
    };
    let rule = match fields[..] {
        ["forbid-guest", base, count] => Rule::ForbidGuest {
            guest: num(base)?,
            count: num(count)?,
        },
        [kind, a, b, count] => {
            let (a, b, count) = (num(a)?, num(b)?, num(count)?);
            match kind {
                "guest" => Rule::Guest {
                    guest: a,
                    host: b,
                    count,
                },
                "host" => Rule::Host {
                    host: a,
                    guest: b,
                    count,
                },
                "map" => Rule::Map {
                    guest: a,
                    host: b,
                    count,
                },
                "squash-guest" => Rule::SquashGuest {
                    guest: a,
                    host: b,
                    count,
                },
                "squash-host" => Rule::SquashHost {
                    host: a,
                    guest: b,
                    count,
                },
                _ => return Err(bad()),
            }
        }
        _ => return Err(bad()),
    };
    // A 1:1 range must fit in the id space on both ends.
    let (base, target, count) = match rule {
        Rule::Guest { guest, host, count } | Rule::Map { guest, host, count } => {
            (guest, host, count)
        }
        Rule::Host { host, guest, count } => (host, guest, count),
        Rule::SquashGuest { guest, count, .. } | Rule::ForbidGuest { guest, count } => {
            (guest, 0, count)
        }
        Rule::SquashHost { host, count, .. } => (host, 0, count),
    };
    if count == 0 {
        return Err(format!("{spec:?}: the count must be at least 1"));
    }
    if base.checked_add(count - 1).is_none() || target.checked_add(count - 1).is_none() {
        return Err(format!("{spec:?}: the range runs past the largest id"));
    }
    Ok(rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(specs: &[&str]) -> IdTranslation {
        IdTranslation::parse(&specs.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn map_goes_both_ways_and_leaves_other_ids_alone() {
        let m = t(&["map:1000:5000:10"]);
        assert_eq!(m.to_host(1000).unwrap(), 5000);
        assert_eq!(m.to_host(1009).unwrap(), 5009);
        assert_eq!(m.to_host(1010).unwrap(), 1010);
        assert_eq!(m.to_guest(5003), 1003);
        assert_eq!(m.to_guest(4999), 4999);
        assert_eq!(m.to_host(0).unwrap(), 0);
    }

    #[test]
    fn one_way_rules_apply_in_their_direction_only() {
        let m = t(&["guest:0:100000:65536", "host:0:7:1"]);
        assert_eq!(m.to_host(0).unwrap(), 100000);
        assert_eq!(m.to_guest(100000), 100000);
        assert_eq!(m.to_guest(0), 7);
    }

    #[test]
    fn squash_and_forbid() {
        let m = t(&[
            "forbid-guest:0:1",
            "squash-guest:1:1000:999",
            "squash-host:0:65534:1000",
        ]);
        assert_eq!(m.to_host(0).unwrap_err().raw_os_error(), Some(libc::EPERM));
        assert_eq!(m.to_host(1).unwrap(), 1000);
        assert_eq!(m.to_host(999).unwrap(), 1000);
        assert_eq!(m.to_host(1000).unwrap(), 1000);
        assert_eq!(m.to_guest(0), 65534);
        assert_eq!(m.to_guest(999), 65534);
        assert_eq!(m.to_guest(1000), 1000);
    }

    #[test]
    fn the_first_rule_that_holds_the_id_decides() {
        let m = t(&["map:0:1000:10", "map:0:2000:10"]);
        assert_eq!(m.to_host(5).unwrap(), 1005);
        assert_eq!(m.to_guest(2005), 5);
        assert_eq!(m.to_guest(1005), 5);
    }

    #[test]
    fn bad_rules_name_the_problem() {
        for (spec, what) in [
            ("map:1:2", "expected"),
            ("swap:1:2:3", "expected"),
            ("map:x:2:3", "not an id"),
            ("map:1:2:0", "at least 1"),
            ("map:4294967295:0:2", "past the largest id"),
            ("forbid-guest:1:2:3", "expected"),
        ] {
            let err = IdTranslation::parse(&[spec.to_string()]).unwrap_err();
            assert!(err.contains(what), "{spec}: {err}");
        }
    }
}
