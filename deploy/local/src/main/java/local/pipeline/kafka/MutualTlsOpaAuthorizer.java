package local.pipeline.kafka;

import java.net.http.HttpClient;
import java.security.Security;
import java.time.Duration;
import java.util.HashMap;
import java.util.Map;

import javax.net.ssl.SSLContext;

import io.spiffe.provider.SpiffeProvider;
import io.spiffe.provider.SpiffeProviderConstants;
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
 * <p>Under Strimzi the broker's {@code ssl.*} settings are not ours to set (the operator owns them,
 * and writes its listeners' TLS settings per listener), so any {@value #SSL_PREFIX}{@code *}
 * setting overrides the broker's {@code ssl.*} one of the same name, for the calls to OPA only:
 * there, {@code opa.authorizer.ssl.keymanager.algorithm=Spiffe} and
 * {@code opa.authorizer.ssl.trustmanager.algorithm=Spiffe} give the broker its SVID towards OPA
 * while its listeners keep Strimzi's certificates.
 *
 * <p>The SPIFFE key and trust managers are java-spiffe's security provider. Natively the broker's
 * {@code security.providers} ({@link SpiffeProviderCreator}) installs it, a setting Strimzi refuses;
 * so when the TLS settings above name its algorithm ({@code Spiffe}) for the key or trust manager,
 * this installs the provider itself. That is the simplest correct trigger: the settings that need
 * the provider are the ones that ask for it, with no second switch to keep in step with them, and
 * no provider installed where nothing uses it. Installing is a no-op when a provider of that name
 * is there already (the JDK adds one name once), so {@code security.providers} keeps working.
 *
 * <p>Super users ({@code super.users}, Kafka's {@code User:a;User:b}; Strimzi adds its brokers and
 * operators, by DN) are the plugin's: it allows them without asking OPA (OpaAuthorizer 1.5.1
 * {@code doAuthorize}: {@code isSuperUser(principal) || allowAccess(...)}, an exact match on
 * {@code principal.toString()} of each {@code ;}-separated entry, so no spaces around the {@code ;}).
 *
 * <p>Fail closed stays the plugin's: a refused request (401, no {@code result}) or an unreachable
 * OPA is a denial with {@code opa.authorizer.allow.on.error=false}; a key store that cannot be
 * read stops the broker at start, where the plugin alone would log it and go on without TLS.
 */
public class MutualTlsOpaAuthorizer extends OpaAuthorizer {

    /** The plugin's own connect timeout, kept. */
    private static final Duration CONNECT_TIMEOUT = Duration.ofSeconds(5);

    /** Authorizer settings that override the broker's {@code ssl.*} ones towards OPA. */
    public static final String SSL_PREFIX = "opa.authorizer.ssl.";

    @Override
    public void configure(Map<String, ?> configs) {
        super.configure(configs);
        AllowCallable.client_$eq(HttpClient.newBuilder()
            .sslContext(sslContext(configs))
            .connectTimeout(CONNECT_TIMEOUT)
            .build());
    }

    /**
     * The client TLS context of the broker's {@code ssl.*} settings, each overridden by its
     * {@value #SSL_PREFIX} form if set. Kafka hands the authorizer the
     * broker's configuration as given (strings); parsing it with the client SSL definitions gives
     * the factory the typed values and defaults it expects.
     */
    static SSLContext sslContext(Map<String, ?> configs) {
        Map<String, Object> settings = tlsSettings(configs);
        // The broker installs its security.providers (natively the SPIFFE key and trust managers)
        // after it has configured its authorizer: installed here first (adding one twice is a no-op).
        SecurityUtils.addConfiguredSecurityProviders(settings);
        installSpiffeProviderIfNamed(settings);
        Map<String, Object> ssl = new HashMap<>(new ConfigDef().withClientSslSupport().parse(settings));
        // A server-side setting the client definitions lack; unset, the factory warns at each start.
        ssl.put("ssl.client.auth", "none");
        DefaultSslEngineFactory factory = new DefaultSslEngineFactory();
        factory.configure(ssl);
        return factory.sslContext();
    }

    /** The broker's settings, each {@value #SSL_PREFIX}x replacing ssl.x. */
    static Map<String, Object> tlsSettings(Map<String, ?> configs) {
        Map<String, Object> settings = new HashMap<>(configs);
        configs.forEach((key, value) -> {
            if (key.startsWith(SSL_PREFIX)) {
                settings.put("ssl." + key.substring(SSL_PREFIX.length()), value);
            }
        });
        return settings;
    }

    /**
     * Installs java-spiffe's provider when the key or trust manager algorithm is its own; a no-op
     * otherwise or when a provider of its name is installed already.
     */
    static void installSpiffeProviderIfNamed(Map<String, ?> settings) {
        if (namesSpiffe(settings.get("ssl.keymanager.algorithm")) || namesSpiffe(settings.get("ssl.trustmanager.algorithm"))) {
            Security.addProvider(new SpiffeProvider());
        }
    }

    private static boolean namesSpiffe(Object algorithm) {
        // JCA looks algorithms up case-insensitively.
        return algorithm != null && SpiffeProviderConstants.ALGORITHM.equalsIgnoreCase(algorithm.toString().trim());
    }
}
