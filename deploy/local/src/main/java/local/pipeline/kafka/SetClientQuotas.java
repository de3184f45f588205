package local.pipeline.kafka;

import java.io.FileInputStream;
import java.io.IOException;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.common.quota.ClientQuotaAlteration;
import org.apache.kafka.common.quota.ClientQuotaEntity;

/**
 * Sets per-principal client quotas in one call: the stack bootstrap uses it to rate-limit
 * each source identity, so one flooding source is throttled without slowing the others.
 * Neither Python Kafka client has the AlterClientQuotas API, hence this small tool.
 *
 * <p>Usage: SetClientQuotas CLIENT_PROPERTIES PRINCIPAL=QUOTA:VALUE[,QUOTA:VALUE] ...
 * e.g. spiffe://pipeline.local/source/web=producer_byte_rate:33554432
 */
public final class SetClientQuotas {
  private SetClientQuotas() {}

  public static void main(String[] args) throws Exception {
    if (args.length < 2) {
      System.err.println("usage: SetClientQuotas CLIENT_PROPERTIES PRINCIPAL=QUOTA:VALUE[,...] ...");
      System.exit(2);
    }
    Properties config = load(args[0]);
    List<ClientQuotaAlteration> alterations = new ArrayList<>();
    for (int i = 1; i < args.length; i++) {
      alterations.add(parse(args[i]));
    }
    try (Admin admin = Admin.create(config)) {
      admin.alterClientQuotas(alterations).all().get(60, TimeUnit.SECONDS);
    }
    System.out.println("quotas set for " + alterations.size() + " principal(s)");
  }

  static ClientQuotaAlteration parse(String arg) {
    int eq = arg.lastIndexOf('=');
    if (eq <= 0) {
      throw new IllegalArgumentException("expected PRINCIPAL=QUOTA:VALUE[,...], got " + arg);
    }
    String principal = arg.substring(0, eq);
    List<ClientQuotaAlteration.Op> ops = new ArrayList<>();
    for (String quota : arg.substring(eq + 1).split(",")) {
      String[] kv = quota.split(":", 2);
      if (kv.length != 2) {
        throw new IllegalArgumentException("expected QUOTA:VALUE, got " + quota);
      }
      ops.add(new ClientQuotaAlteration.Op(kv[0], Double.valueOf(kv[1])));
    }
    ClientQuotaEntity entity = new ClientQuotaEntity(Map.of(ClientQuotaEntity.USER, principal));
    return new ClientQuotaAlteration(entity, ops);
  }

  private static Properties load(String path) throws IOException {
    Properties properties = new Properties();
    try (FileInputStream in = new FileInputStream(path)) {
      properties.load(in);
    }
    return properties;
  }
}
