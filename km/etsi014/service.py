"""ETSI GS QKD 014 semantics at a KM, independent of HTTP.

The caller is the SAE named by its client certificate; it may only act as itself and only
at the KM of the node it is attached to. Requests are checked against the limits the KM
announces in its status before anything is taken. A KM that holds no topology yet knows no
SAE and answers every call 503, saying it awaits its configuration. dec_keys finds the keys
at whichever KM replica of the node holds them (``replicas.NodeReplicas``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vqkd.km.domain import errors
from vqkd.km.domain.keystore import NotASlave
from vqkd.km.etsi014 import schema

if TYPE_CHECKING:
    from vqkd.km.domain.exchange import Issued, KeyExchange
    from vqkd.km.domain.keymanager import KeyManager
    from vqkd.km.domain.replicas import NodeReplicas


class ETSI014Service:
    def __init__(self, km: KeyManager, exchange: KeyExchange, replicas: NodeReplicas):
        self.km = km
        self.exchange = exchange
        self.replicas = replicas

    def _caller_here(self, caller: str) -> None:
        self.km.check_configured()
        if not self.km.is_local(caller):
            raise errors.NotAuthorized(f"SAE {caller} is not attached to node {self.km.node}")

    def _peer_sae(self, sae_id: str, role: str, caller: str) -> str:
        node = self.km.node_of(sae_id)
        if node is None:
            raise errors.InvalidRequest(f"{role} SAE {sae_id!r} is not known to KME {self.km.kme_id}")
        if sae_id == caller:
            raise errors.InvalidRequest(f"{role} SAE must differ from the calling SAE {caller!r}")
        return node

    def status(self, caller: str, slave: str) -> dict:
        self._caller_here(caller)
        node = self._peer_sae(slave, "slave", caller)
        limits = self.km.limits
        ends = self.km.link_to.get(node)
        if ends:  # one end per KM replica of the node: what they hold together
            stored = sum(link.outgoing.available_bits for link in ends) // limits.key_size
            max_count = sum(link.config.pool_target_bits for link in ends) // limits.key_size
        else:  # keys for an SAE on this node are made on demand; a node with no link has none
            stored = max_count = limits.max_key_per_request if node == self.km.node else 0
        return {
            "source_KME_ID": self.km.kme_id,
            "target_KME_ID": self.km.kme_id_of(node),
            "master_SAE_ID": caller,
            "slave_SAE_ID": slave,
            "key_size": limits.key_size,
            "stored_key_count": stored,
            "max_key_count": max_count,
            "max_key_per_request": limits.max_key_per_request,
            "max_key_size": limits.max_key_size,
            "min_key_size": limits.min_key_size,
            "max_SAE_ID_count": 0,
        }

    def _checked(self, request: schema.KeyRequest) -> tuple[int, int]:
        limits = self.km.limits
        number = 1 if request.number is None else request.number
        size = limits.key_size if request.size is None else request.size
        if request.extension_mandatory:
            raise errors.InvalidRequest(schema.MSG_MANDATORY_UNSUPPORTED)
        if request.additional_slave_SAE_IDs:
            raise errors.InvalidRequest(
                "additional_slave_SAE_IDs are not supported by this KME (max_SAE_ID_count is 0)"
            )
        if not 1 <= number <= limits.max_key_per_request:
            raise errors.InvalidRequest(
                f"number must be between 1 and max_key_per_request={limits.max_key_per_request}, got {number}"
            )
        if size % 8:
            raise errors.InvalidRequest(schema.MSG_SIZE_MULTIPLE_OF_8)
        if not limits.min_key_size <= size <= limits.max_key_size:
            raise errors.InvalidRequest(
                f"size must be between min_key_size={limits.min_key_size} and "
                f"max_key_size={limits.max_key_size} bits, got {size}"
            )
        return number, size

    async def enc_keys(self, caller: str, slave: str, request: schema.KeyRequest) -> Issued:
        self._caller_here(caller)
        self._peer_sae(slave, "slave", caller)
        number, size = self._checked(request)
        return await self.exchange.issue(caller, [slave], number, size)

    async def dec_keys(self, caller: str, master: str, key_ids: list[str]) -> list[tuple[str, bytes, dict | None]]:
        self._caller_here(caller)
        self._peer_sae(master, "master", caller)
        if not key_ids:
            raise errors.InvalidRequest("key_IDs must name at least one key")
        if len(key_ids) > self.km.limits.max_key_per_request:
            raise errors.InvalidRequest(
                f"at most max_key_per_request={self.km.limits.max_key_per_request} key IDs per request, "
                f"got {len(key_ids)}"
            )
        try:
            found = await self.replicas.take(caller, master, key_ids)
        except errors.KeysNotFound:
            raise errors.KeysNotFound(schema.MSG_KEYS_NOT_FOUND) from None
        except NotASlave:
            raise errors.NotAuthorized(f"SAE {caller} is not a slave SAE of the keys it named") from None
        return [(key_id, entry.key, entry.extension) for key_id, entry in found]
