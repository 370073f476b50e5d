//! `certificates` entries -> `CertificateSource`: files, self-signed names, ACME specs.
//! Split from `validate` (same rules, same error shape); the files themselves are read when
//! the snapshot is built.

use super::file::CertificateFile;
use super::types::{
    AcmeSpec, CertificateSource, KeyedError, LETS_ENCRYPT, LETS_ENCRYPT_STAGING, is_dns_name,
};

pub(super) fn certificate(
    index: usize,
    entry: CertificateFile,
) -> Result<CertificateSource, KeyedError> {
    let key = format!("certificates.{index}");
    if let Some(acme) = entry.acme {
        if entry.cert.is_some() || entry.key.is_some() || entry.self_signed.is_some() {
            return Err((
                key,
                "give either cert + key, self_signed: [names], or acme: {...}".into(),
            ));
        }
        return acme_spec(&key, acme).map(|spec| CertificateSource::Acme { index, spec });
    }
    match (entry.cert, entry.key, entry.self_signed) {
        (Some(cert), Some(key), None) => Ok(CertificateSource::Files { index, cert, key }),
        (None, None, Some(names)) => {
            if names.is_empty() {
                return Err((
                    format!("{key}.self_signed"),
                    "needs at least one name".into(),
                ));
            }
            for (i, n) in names.iter().enumerate() {
                if !is_dns_name(n) {
                    return Err((
                        format!("{key}.self_signed.{i}"),
                        format!("{n:?} is not a DNS name"),
                    ));
                }
            }
            Ok(CertificateSource::SelfSigned {
                index,
                names: names.iter().map(|n| n.to_ascii_lowercase()).collect(),
            })
        }
        (Some(_), None, None) => Err((format!("{key}.key"), "cert given without key".into())),
        (None, Some(_), None) => Err((format!("{key}.cert"), "key given without cert".into())),
        _ => Err((
            key,
            "give either cert + key, self_signed: [names], or acme: {...}".into(),
        )),
    }
}

fn acme_spec(key: &str, a: crate::config::file::AcmeFile) -> Result<AcmeSpec, KeyedError> {
    if a.domains.is_empty() {
        return Err((
            format!("{key}.acme.domains"),
            "needs at least one name".into(),
        ));
    }
    for (i, d) in a.domains.iter().enumerate() {
        if d.starts_with("*.") {
            return Err((
                format!("{key}.acme.domains.{i}"),
                format!("{d:?}: wildcards need DNS-01, and tls-alpn-01 is what this proxy answers"),
            ));
        }
        if !is_dns_name(d) {
            return Err((
                format!("{key}.acme.domains.{i}"),
                format!("{d:?} is not a DNS name"),
            ));
        }
    }
    for (i, c) in a.contact.iter().enumerate() {
        if !c.starts_with("mailto:") {
            return Err((
                format!("{key}.acme.contact.{i}"),
                format!("{c:?} must be a mailto: URL"),
            ));
        }
    }
    let directory = match a.directory.as_str() {
        "letsencrypt" => LETS_ENCRYPT.to_owned(),
        "letsencrypt-staging" => LETS_ENCRYPT_STAGING.to_owned(),
        url if url.starts_with("https://") => url.to_owned(),
        other => {
            return Err((
                format!("{key}.acme.directory"),
                format!("{other:?}: use letsencrypt, letsencrypt-staging or an https:// URL"),
            ));
        }
    };
    Ok(AcmeSpec {
        domains: a.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        contact: a.contact,
        directory,
        directory_ca: a.directory_ca,
        cache: a.cache,
        rotate_key: a.rotate_key,
    })
}
