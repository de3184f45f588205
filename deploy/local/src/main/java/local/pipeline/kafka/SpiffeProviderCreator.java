package local.pipeline.kafka;

import java.security.Provider;

import io.spiffe.provider.SpiffeProvider;
import org.apache.kafka.common.security.auth.SecurityProviderCreator;

/**
 * Registers java-spiffe's security provider with the broker ({@code security.providers}), so that
 * {@code ssl.keymanager.algorithm=Spiffe} and {@code ssl.trustmanager.algorithm=Spiffe} resolve.
 *
 * <p>Why: the broker then takes its X.509-SVID and the trust bundle from the SPIFFE Workload API
 * (the socket in {@code SPIFFE_ENDPOINT_SOCKET}) and follows every renewal in memory: each new TLS
 * handshake presents the current SVID, with no key store file to rewrite and no listener to
 * reconfigure. The trust manager accepts any SPIFFE ID of the bundle's trust domain
 * ({@code -Dssl.spiffe.acceptAll=true}); which principal may do what is OPA's decision.
 */
public final class SpiffeProviderCreator implements SecurityProviderCreator {
    @Override
    public Provider getProvider() {
        return new SpiffeProvider();
    }
}
