//! `--xattrmap`: extended attribute names translated between guest and host, in virtiofsd's
//! rule language (its doc/xattr-mapping.md).
//!
//! A map is a list of rules `:type:scope:key:prepend:`, the separator being the first
//! non-blank character of each rule. Names from the guest (get, set, remove) are matched
//! against `key` by rules of scope `client` or `all`; names from the host (list) against
//! `prepend` by rules of scope `server` or `all`. The first matching rule decides:
//! `prefix` puts `prepend` before the guest's name (guest to host) and strips it (host to guest),
//! `ok` passes the name unchanged, `bad` refuses a guest name with EPERM (ENODATA for a get)
//! and hides a host name, `unsupported` refuses with ENOTSUP and hides. A name no rule
//! matches is refused or hidden. `:map:key:prepend:` (last, at most once) stands for the rules
//! that prefix `key` with `prepend` and keep the two apart.

use std::borrow::Cow;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Prefix,
    Ok,
    Bad,
    Unsupported,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    Client,
    Server,
    All,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    kind: Kind,
    scope: Scope,
    key: Vec<u8>,
    prepend: Vec<u8>,
}

impl Rule {
    fn new(kind: Kind, scope: Scope, key: &[u8], prepend: &[u8]) -> Self {
        Rule {
            kind,
            scope,
            key: key.to_vec(),
            prepend: prepend.to_vec(),
        }
    }
}

/// What a guest's attribute name becomes on the host.
#[derive(Debug, PartialEq, Eq)]
pub enum GuestName<'a> {
    /// Use this host name.
    Host(Cow<'a, [u8]>),
    /// Refused by a `bad` rule, or by no rule at all.
    Denied,
    /// Refused by an `unsupported` rule.
    Unsupported,
}

/// A parsed `--xattrmap`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XattrMap {
    rules: Vec<Rule>,
}

impl XattrMap {
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut rules = Vec::new();
        let mut rest = spec.trim_start();
        let mut saw_map = false;
        while !rest.is_empty() {
            if saw_map {
                return Err(format!(
                    "--xattrmap: the map rule must be the last rule, but {rest:?} follows it"
                ));
            }
            let sep = rest.chars().next().expect("not empty");
            rest = &rest[sep.len_utf8()..];
            let mut field = |what: &str| -> Result<&str, String> {
                match rest.find(sep) {
                    Some(end) => {
                        let value = &rest[..end];
                        rest = &rest[end + sep.len_utf8()..];
                        Ok(value)
                    }
                    None => Err(format!(
                        "--xattrmap: a rule ends before its {what} field (each field, the last \
                         too, is followed by the separator {sep:?})"
                    )),
                }
            };
            let kind = field("type")?;
            if kind == "map" {
                let key = field("key")?.as_bytes().to_vec();
                let prepend = field("prepend")?.as_bytes().to_vec();
                rules.extend(map_rules(&key, &prepend));
                saw_map = true;
            } else {
                let kind = match kind {
                    "prefix" => Kind::Prefix,
                    "ok" => Kind::Ok,
                    "bad" => Kind::Bad,
                    "unsupported" => Kind::Unsupported,
                    other => {
                        return Err(format!(
                            "--xattrmap: unknown rule type {other:?} (prefix, ok, bad, \
                             unsupported or map)"
                        ))
                    }
                };
                let scope = match field("scope")? {
                    "client" => Scope::Client,
                    "server" => Scope::Server,
                    "all" => Scope::All,
                    other => {
                        return Err(format!(
                            "--xattrmap: unknown scope {other:?} (client, server or all)"
                        ))
                    }
                };
                let key = field("key")?.as_bytes().to_vec();
                let prepend = field("prepend")?.as_bytes().to_vec();
                rules.push(Rule {
                    kind,
                    scope,
                    key,
                    prepend,
                });
            }
            rest = rest.trim_start();
        }
        if rules.is_empty() {
            return Err("--xattrmap: no rules".into());
        }
        Ok(XattrMap { rules })
    }

    /// The host name for a name the guest uses (getxattr, setxattr, removexattr).
    pub fn to_host<'a>(&self, name: &'a [u8]) -> GuestName<'a> {
        for rule in &self.rules {
            if rule.scope == Scope::Server || !name.starts_with(&rule.key) {
                continue;
            }
            return match rule.kind {
                Kind::Prefix => {
                    let mut host = rule.prepend.clone();
                    host.extend_from_slice(name);
                    GuestName::Host(Cow::Owned(host))
                }
                Kind::Ok => GuestName::Host(Cow::Borrowed(name)),
                Kind::Bad => GuestName::Denied,
                Kind::Unsupported => GuestName::Unsupported,
            };
        }
        GuestName::Denied
    }

    /// The name the guest sees for a host attribute (listxattr), or `None` to hide it.
    pub fn to_guest<'a>(&self, name: &'a [u8]) -> Option<Cow<'a, [u8]>> {
        for rule in &self.rules {
            if rule.scope == Scope::Client || !name.starts_with(&rule.prepend) {
                continue;
            }
            return match rule.kind {
                Kind::Prefix => Some(Cow::Borrowed(&name[rule.prepend.len()..])),
                Kind::Ok => Some(Cow::Borrowed(name)),
                Kind::Bad | Kind::Unsupported => None,
            };
        }
        None
    }
}

/// The rules `:map:key:prepend:` stands for.
fn map_rules(key: &[u8], prepend: &[u8]) -> Vec<Rule> {
    if key.is_empty() {
        // Every name gets the prefix; host names without it are hidden.
        return vec![
            Rule::new(Kind::Prefix, Scope::All, key, prepend),
            Rule::new(Kind::Bad, Scope::All, b"", b""),
        ];
    }
    vec![
        Rule::new(Kind::Prefix, Scope::All, key, prepend),
        // Host names that are `key` unprefixed are hidden, and the guest may not reach the
        // prefixed names directly (it would bypass the access rules of `key`).
        Rule::new(Kind::Bad, Scope::Server, b"", key),
        Rule::new(Kind::Bad, Scope::Client, prepend, b""),
        Rule::new(Kind::Ok, Scope::All, b"", b""),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(m: &XattrMap, name: &str) -> Result<String, &'static str> {
        match m.to_host(name.as_bytes()) {
            GuestName::Host(h) => Ok(String::from_utf8(h.into_owned()).unwrap()),
            GuestName::Denied => Err("denied"),
            GuestName::Unsupported => Err("unsupported"),
        }
    }

    fn guest(m: &XattrMap, name: &str) -> Option<String> {
        m.to_guest(name.as_bytes())
            .map(|g| String::from_utf8(g.into_owned()).unwrap())
    }

    #[test]
    fn prefix_everything() {
        for spec in [
            ":prefix:all::user.virtiofs.::bad:all:::",
            ":map::user.virtiofs.:",
        ] {
            let m = XattrMap::parse(spec).unwrap();
            assert_eq!(host(&m, "trusted.x").unwrap(), "user.virtiofs.trusted.x");
            assert_eq!(host(&m, "user.a").unwrap(), "user.virtiofs.user.a");
            assert_eq!(guest(&m, "user.virtiofs.trusted.x").unwrap(), "trusted.x");
            assert_eq!(guest(&m, "security.selinux"), None, "{spec}");
        }
    }

    #[test]
    fn prefix_one_namespace_and_keep_the_two_apart() {
        let long = "/prefix/all/trusted./user.virtiofs./
                    /bad/server//trusted./
                    /bad/client/user.virtiofs.//
                    /ok/all///";
        for spec in [long, "/map/trusted./user.virtiofs./"] {
            let m = XattrMap::parse(spec).unwrap();
            assert_eq!(host(&m, "trusted.x").unwrap(), "user.virtiofs.trusted.x");
            assert_eq!(host(&m, "user.plain").unwrap(), "user.plain");
            assert_eq!(host(&m, "user.virtiofs.trusted.x"), Err("denied"), "{spec}");
            assert_eq!(guest(&m, "user.virtiofs.trusted.x").unwrap(), "trusted.x");
            assert_eq!(guest(&m, "trusted.host-only"), None, "{spec}");
            assert_eq!(guest(&m, "user.plain").unwrap(), "user.plain");
        }
    }

    #[test]
    fn bad_unsupported_and_unmatched() {
        let m = XattrMap::parse(
            "/unsupported/all/security.selinux/security.selinux//bad/client/trusted.//",
        )
        .unwrap();
        assert_eq!(host(&m, "security.selinux"), Err("unsupported"));
        assert_eq!(host(&m, "trusted.a"), Err("denied"));
        assert_eq!(host(&m, "user.a"), Err("denied"), "no rule matches");
        assert_eq!(guest(&m, "security.selinux"), None);
        assert_eq!(guest(&m, "user.a"), None, "no rule matches");
    }

    #[test]
    fn bad_maps_are_refused_with_the_reason() {
        for (spec, why) in [
            ("", "no rules"),
            (":prefix:all:a:b", "ends before its prepend"),
            (":swap:all:a:b:", "unknown rule type"),
            (":ok:both:::", "unknown scope"),
            (":map::p::ok:all:::", "must be the last rule"),
        ] {
            let err = XattrMap::parse(spec).unwrap_err();
            assert!(err.contains(why), "{spec:?}: {err}");
        }
    }
}
