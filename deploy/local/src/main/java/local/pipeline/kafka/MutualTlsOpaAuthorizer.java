package local.pipeline.kafka;

import java.net.http.HttpClient;
import java.time.Duration;
import java.util.HashMap;
import java.util.Map;

import javax.net.ssl.SSLContext;

import org.apache.kafka.common.config.ConfigDef;
import org.apache.kafka.common.security.ssl.DefaultSslEngineFactory;
import org.apache.kafka.common.utils.SecurityUtils;
import org.openpolicyagent.kafka.AllowCallable;
import org.openpolicyagent.kafka.OpaAuthorizer;

/**
 * The OPA authorizer plugin ({@code org.openpolicyagent.kafka:opa-authorizer} 1.5.1), asking
 * OPA over mutual TLS as the broker.
 *
 * <p>Why: OPA's API answers no request without a client certificate from the trust bundle, and
 * decides by its SPIFFE ID which decisions a caller may ask for (opa/system/authz.rego). The
 * plugin can only be given a trust store ({@code opa.authorizer.truststore.*}, PKCS12/JKS): it
 * can verify OPA but cannot present a certificate. Every decision it asks goes through one HTTP
 * client, a static field of its {@code AllowCallable} (a Scala object {@code var}, hence the
 * public {@code client_$eq} setter), which the plugin's own configure() replaces when a trust
 * store is set. This replaces it the same way, with a client whose TLS context presents the
 * broker's SVID and trusts only the bundle.
 *
 * <p>The TLS context is built by Kafka's own {@link DefaultSslEngineFactory} from the broker's
 * {@code ssl.*} settings (in the native stack, java-spiffe's key and trust managers: the SVID and
 * bundle from the Workload API, renewed in memory; PEM key and trust stores work as well): the
 * broker has one TLS identity, towards its clients and towards OPA, configured in one place. The JDK HTTP client verifies OPA's certificate
 * against the host of {@code opa.authorizer.url}.
 *
 * <p>Fail closed stays the plugin's: a refused request (401, no {@code result}) or an unreachable
 * OPA is a denial with {@code opa.authorizer.allow.on.error=false}; a key store that cannot be
 * read stops the broker at start, where the plugin alone would log it and go on without TLS.
 */
public class MutualTlsOpaAuthorizer extends OpaAuthorizer {

    /** The plugin's own connect timeout, kept. */
    private static final Duration CONNECT_TIMEOUT = Duration.ofSeconds(5);

    @Override
    public void configure(Map<String, ?> configs) {
        super.configure(configs);
        AllowCallable.client_$eq(HttpClient.newBuilder()
            .sslContext(sslContext(configs))
            .connectTimeout(CONNECT_TIMEOUT)
            .build());
    }

    /**
     * The client TLS context of the broker's {@code ssl.*} settings. Kafka hands the authorizer the
     * broker's configuration as given (strings); parsing it with the client SSL definitions gives
     * the factory the typed values and defaults it expects.
     */
    static SSLContext sslContext(Map<String, ?> configs) {
        // The broker installs its security.providers (the SPIFFE key and trust managers) after it
        // has configured its authorizer: installed here first (adding one twice is a no-op).
        SecurityUtils.addConfiguredSecurityProviders(configs);
        Map<String, Object> ssl = new HashMap<>(new ConfigDef().withClientSslSupport().parse(configs));
        // A server-side setting the client definitions lack; unset, the factory warns at each start.
        ssl.put("ssl.client.auth", "none");
        DefaultSslEngineFactory factory = new DefaultSslEngineFactory();
        factory.configure(ssl);
        return factory.sslContext();
    }
}
