//! [`Shared`]: a message field held behind a reference count, so that equal values can share one
//! allocation.
//!
//! The controller keeps every service and every task in memory, and each task carries the spec
//! of the generation it runs: with the spec inline, a service with ten replicas held eleven
//! copies of it, and copying a task (every status change does) copied the spec with it. The
//! spec fields of `Service` and `Task` are `Option<Shared<ServiceSpec>>` instead (see
//! `build.rs`), so the controller can point a task's spec at its service's, and a copy of a
//! task copies a pointer. On the wire nothing changes: a `Shared<M>` encodes and decodes as `M`.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};

/// A message shared by reference count; reads through [`Deref`], writes through
/// [`Shared::make_mut`] (which copies it first if it is shared).
#[derive(Default)]
pub struct Shared<T>(Arc<T>);

impl<T> Shared<T> {
    pub fn new(value: T) -> Self {
        Self(Arc::new(value))
    }

    /// Whether both point at the same allocation.
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

impl<T: Clone> Shared<T> {
    /// The value to change, copied first if anything else shares it.
    pub fn make_mut(this: &mut Self) -> &mut T {
        Arc::make_mut(&mut this.0)
    }

    /// The value itself, copied if anything else shares it.
    pub fn into_inner(this: Self) -> T {
        Arc::unwrap_or_clone(this.0)
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T> Deref for Shared<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> AsRef<T> for Shared<T> {
    fn as_ref(&self) -> &T {
        &self.0
    }
}

impl<T> From<T> for Shared<T> {
    fn from(value: T) -> Self {
        Self::new(value)
    }
}

/// By value; one allocation is equal to itself without a look (messages are compared by their
/// fields, and tug's have no floating-point field that could be unequal to itself).
impl<T: PartialEq> PartialEq for Shared<T> {
    fn eq(&self, other: &Self) -> bool {
        Self::ptr_eq(self, other) || *self.0 == *other.0
    }
}

impl<T: Eq> Eq for Shared<T> {}

impl<T: fmt::Debug> fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (*self.0).fmt(f)
    }
}

impl<T: serde::Serialize> serde::Serialize for Shared<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (*self.0).serialize(serializer)
    }
}

impl<T: Message + Default + Clone> Message for Shared<T> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        self.0.encode_raw(buf)
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        Arc::make_mut(&mut self.0).merge_field(tag, wire_type, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.encoded_len()
    }

    fn clear(&mut self) {
        match Arc::get_mut(&mut self.0) {
            Some(value) => value.clear(),
            None => self.0 = Arc::new(T::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{ObjectMeta, Service, ServiceSpec, Task};

    fn spec(image: &str) -> ServiceSpec {
        ServiceSpec {
            image: image.into(),
            replicas: 3,
            command: vec!["httpd".into(), "-f".into()],
            ..Default::default()
        }
    }

    #[test]
    fn encodes_as_the_message_it_holds() -> Result<(), DecodeError> {
        let task = Task {
            id: "web.1.x".into(),
            spec_generation: 4,
            spec: Some(spec("busybox").into()),
            ..Default::default()
        };
        let bytes = task.encode_to_vec();
        // The same bytes as the spec field of any message: decoded as a bare ServiceSpec at
        // tag 6, and back as a Task equal to the first.
        let back = Task::decode(bytes.as_slice())?;
        assert_eq!(back, task);
        let spec_bytes = spec("busybox").encode_to_vec();
        let mut field = vec![6 << 3 | 2, spec_bytes.len() as u8];
        field.extend_from_slice(&spec_bytes);
        assert!(
            bytes.windows(field.len()).any(|w| w == field.as_slice()),
            "the spec is encoded as a length-delimited ServiceSpec at tag 6"
        );
        Ok(())
    }

    #[test]
    fn decoding_into_a_shared_value_leaves_the_other_holders_alone() -> Result<(), DecodeError> {
        let shared: Shared<ServiceSpec> = spec("old").into();
        let mut svc = Service {
            metadata: Some(ObjectMeta::default()),
            spec: Some(shared.clone()),
            previous_spec: None,
        };
        svc.merge(
            Service {
                spec: Some(spec("new").into()),
                ..Default::default()
            }
            .encode_to_vec()
            .as_slice(),
        )?;
        assert_eq!(svc.spec.as_deref().map(|s| s.image.as_str()), Some("new"));
        assert_eq!(
            shared.image, "old",
            "the other holder still has its own value"
        );
        Ok(())
    }

    #[test]
    fn equality_is_by_value_and_clones_share() {
        let a: Shared<ServiceSpec> = spec("a").into();
        let b = a.clone();
        assert!(Shared::ptr_eq(&a, &b));
        let c: Shared<ServiceSpec> = spec("a").into();
        assert!(!Shared::ptr_eq(&a, &c));
        assert_eq!(a, c);
        assert_ne!(a, Shared::new(spec("b")));

        let mut d = b.clone();
        Shared::make_mut(&mut d).image = "d".into();
        assert_eq!((a.image.as_str(), d.image.as_str()), ("a", "d"));
        assert_eq!(Shared::into_inner(d).image, "d");
    }

    #[test]
    fn clearing_a_shared_value_resets_only_this_holder() {
        let a: Shared<ServiceSpec> = spec("a").into();
        let mut b = a.clone();
        b.clear();
        assert_eq!(*b, ServiceSpec::default());
        assert_eq!(a.image, "a");
    }

    #[test]
    fn serializes_as_the_value() -> Result<(), serde_yaml_ng::Error> {
        let a: Shared<ServiceSpec> = spec("a").into();
        assert_eq!(
            serde_yaml_ng::to_string(&a)?,
            serde_yaml_ng::to_string(&spec("a"))?
        );
        Ok(())
    }
}
