from chassis.service import main
from services.loyalty.server import definition

main(definition)
